"""The generation server (`python -m gcpo_fast.serve --engine hf`) and its client RemoteEngine, as real processes.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_serve.py

The shipped model in fp32 on both sides; references are its own logits in fp64 from the log-softmax on. The
server's sampling log-probs come from generate's KV-cached steps, the references from one full forward:
they agree to ~1e-5, so LOGP_TOL = 1e-3 (tests/test_vllm_engine.py's) leaves headroom, while an SGD step at
lr 1 moves them by far more (the test asks for > 100 x LOGP_TOL). One server serves the module; the failure
tests start their own.
"""

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from gcpo_fast.distributed.parallel import free_port
from gcpo_fast.engines.base import Sampling
from gcpo_fast.engines.hf import HFEngine
from gcpo_fast.engines.remote import RemoteEngine, launch_server
from gcpo_fast.engines.server_http import API_KEY_ENV
from gcpo_fast.errors import TrainingError
from gcpo_fast.models.loading import DEFAULT_MODEL

LOGP_TOL = 1e-3


@pytest.fixture(scope="module")
def engine(tokenizer):
    engine = launch_server(DEFAULT_MODEL, tokenizer, engine="hf", timeout=120)
    yield engine
    engine.close()


def post(engine, path, body):
    """(HTTP status, JSON body) of a raw request, with the server's API key."""
    headers = {"Authorization": f"Bearer {engine.api_key}"}
    request = urllib.request.Request(
        engine.base_url + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@torch.no_grad()
def reference_logprobs(model, prompt, completion, temperature):
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def worst_gap(model, rows, temperature):
    return max(
        (reference_logprobs(model, p, c, temperature) - torch.tensor(lp, dtype=torch.float64)).abs().max().item()
        for p, c, lp in zip(rows.prompt_ids, rows.completion_ids, rows.sampling_logp, strict=True)
    )


def test_generate_speaks_trl_and_reports_sampling_logprobs(engine, hf, tokenizer, prompt_ids):
    status, out = post(engine, "/generate/", dict(prompts=prompt_ids[:2], n=3, temperature=0.7, max_tokens=24))
    assert status == 200
    assert out["prompt_ids"] == prompt_ids[:2] and len(out["completion_ids"]) == 6 and out["policy_version"] == 0
    assert [len(lp) for lp in out["logprobs"]] == [len(c) for c in out["completion_ids"]]
    assert all(len(token) == 1 for row in out["logprobs"] for token in row)  # TRL's [row][token][1]
    assert len(out["truncated"]) == 6

    rows = engine.generate(prompt_ids, 4, Sampling(max_completion_length=24, temperature=0.7))
    assert rows.prompt_ids == [p for p in prompt_ids for _ in range(4)] and rows.policy_version == [0] * 32
    eos = set(engine.eos_ids)
    assert eos == {tokenizer.eos_token_id, hf.generation_config.eos_token_id}
    for ids, cut, text in zip(rows.completion_ids, rows.truncated, rows.texts, strict=True):
        assert not eos & set(ids[:-1]) and cut == (ids[-1] not in eos) and (not cut or len(ids) == 24)
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert 0 < sum(rows.truncated) < 32
    assert worst_gap(hf, rows, 0.7) < LOGP_TOL


def test_greedy_rows_are_the_in_process_engines(engine, hf, tokenizer, prompt_ids):
    greedy = Sampling(max_completion_length=32, greedy=True)
    ours = engine.generate(prompt_ids, 1, greedy)
    assert ours.completion_ids == HFEngine(hf, tokenizer).generate(prompt_ids, 1, greedy).completion_ids
    assert worst_gap(hf, ours, 1.0) < LOGP_TOL  # greedy rows carry the untempered log-probs


def test_sync_weights_moves_the_servers_logprobs(engine, hf, prompt_ids):
    trained = copy.deepcopy(hf).train()
    width = min(len(p) for p in prompt_ids)
    batch = torch.tensor([p[:width] for p in prompt_ids])
    trained(batch, labels=batch).loss.backward()
    torch.optim.SGD(trained.parameters(), lr=1.0).step()
    trained.eval()
    sampling = Sampling(max_completion_length=16, temperature=1.0)
    try:
        engine.sync_weights(trained.named_parameters(), version=1)
        assert engine.version == 1
        rows = engine.generate(prompt_ids, 2, sampling)
        assert rows.policy_version == [1] * len(rows)
        synced, stale = worst_gap(trained, rows, 1.0), worst_gap(hf, rows, 1.0)
        assert synced < LOGP_TOL, f"after the sync the server is {synced:.2e} from the trained model"
        assert stale > 100 * LOGP_TOL, f"the step barely moved the log-probs ({stale:.2e})"
    finally:
        engine.sync_weights(hf.named_parameters(), version=2)  # the module's server back on the shipped weights
    assert worst_gap(hf, engine.generate(prompt_ids[:2], 2, sampling), 1.0) < LOGP_TOL


def test_bad_requests_get_400_with_a_reason(engine, tokenizer):
    for body, reason in [
        (dict(prompts=[]), "prompts must be a non-empty list"),
        (dict(prompts=[[1, 2]], n=0), "n and max_tokens must be >= 1"),
        (dict(prompts=[[len(tokenizer) + 5]]), "every token id must be an int in"),
        (dict(prompts=[[1, 2]], temperature="hot"), "temperature must be float"),
        (dict(prompts=[[1, 2]], logprobs=5), "only 0"),
        (dict(prompts=[[1, 2]], repetition_penalty=1.3), "not supported by this server: \\['repetition_penalty'\\]"),
        (dict(prompts=[[1, 2]], beams=4), "unknown fields \\['beams'\\]"),
    ]:
        status, out = post(engine, "/generate/", body)
        assert status == 400 and "\n" not in out["error"]
        assert re.search(reason, out["error"]), out
    assert post(engine, "/update_weights/", {"version": "x"})[0] == 400
    assert post(engine, "/no_such/", {})[0] == 404
    with pytest.raises(TrainingError, match=r"HTTP 400: .*max_tokens"):  # the client's one line
        engine.generate([[1, 2]], 1, Sampling(max_completion_length=0))


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_killed_server_is_one_line_not_a_hang(tokenizer, hf, prompt_ids):
    engine = launch_server(DEFAULT_MODEL, tokenizer, engine="hf", timeout=120)
    try:
        engine.sync_weights(hf.named_parameters(), version=1)  # the weight group is up

        def killing_midway(named):  # the server dies after the first tensor of an update has gone
            for i, item in enumerate(named):
                yield item
                if i == 0:
                    engine.process.send_signal(signal.SIGKILL)
                    engine.process.wait()

        start = time.monotonic()
        with pytest.raises(TrainingError, match=engine.base_url) as e:
            engine.sync_weights(killing_midway(hf.named_parameters()), version=2)
        print(one_line(e))
        with pytest.raises(TrainingError, match=rf"{engine.base_url}/generate/: .*refused") as e:
            engine.generate(prompt_ids[:1], 1, Sampling(max_completion_length=4))
        one_line(e)
        with pytest.raises(TrainingError, match=rf"{engine.base_url}/init_communicator/: .*refused") as e:
            engine.sync_weights(hf.named_parameters(), version=3)
        one_line(e)
        assert time.monotonic() - start < 20
    finally:
        engine.close()


def test_a_second_client_takes_over_the_weight_group(tokenizer, hf, prompt_ids):
    first = launch_server(DEFAULT_MODEL, tokenizer, engine="hf", timeout=120)
    try:
        first.sync_weights(hf.named_parameters(), version=1)
        first.group = None  # a trainer that died without closing: its group is left on the server
        second = RemoteEngine(first.base_url, tokenizer, timeout=10, group_port=first.group_port, api_key=first.api_key)
        assert second.version == 1  # what the server holds
        halved = {n: t * 0.5 if n.endswith("norm.weight") else t for n, t in hf.named_parameters()}
        second.sync_weights(halved.items(), version=7)
        rows = second.generate(prompt_ids[:2], 2, Sampling(max_completion_length=8))
        assert rows.policy_version == [7] * 4
        changed = copy.deepcopy(hf)
        changed.load_state_dict({**hf.state_dict(), **halved}, strict=False)
        assert worst_gap(changed, rows, 1.0) < LOGP_TOL < 100 * LOGP_TOL < worst_gap(hf, rows, 1.0)
    finally:
        first.close()
    assert first.process.returncode == 0  # SIGTERM: the server closed its engine and exited cleanly


def test_server_user_mistakes_are_one_line(tmp_path, tokenizer):
    with pytest.raises(TrainingError, match=r"exited with status 1 before it served: .*cannot load") as e:
        launch_server(tmp_path / "absent", tokenizer, engine="hf", timeout=60)
    one_line(e)
    with pytest.raises(TrainingError, match="tensor_parallel_size 2 is not supported yet") as e:
        launch_server(DEFAULT_MODEL, tokenizer, engine="hf", timeout=60, server_args=("--tensor_parallel_size", "2"))
    with pytest.raises(TrainingError, match=r"did not answer /health/ within 1 s"):
        RemoteEngine(f"http://127.0.0.1:{free_port()}", tokenizer, timeout=1)  # nothing listens there


def test_nccl_only_between_two_cuda_devices():
    from gcpo_fast.engines.weight_transport import pick_backend

    assert pick_backend("GPU-a", "GPU-b") == "nccl"
    assert pick_backend("GPU-a", "GPU-a") == "gloo"  # one device: NCCL refuses two ranks on it
    assert pick_backend("GPU-a", None) == pick_backend(None, "GPU-b") == pick_backend(None, None) == "gloo"


def test_torchrun_ranks_sample_from_one_server_and_rank_0_sends(tokenizer, tmp_path):
    """`torchrun --nproc_per_node 2 -m gcpo_fast.train --use_vllm --vllm_mode server`: both ranks sample from the
    server; only rank 0 sends the weights (one update per sync in the server's log), and every rank's
    log-probs of the server's samples match its own after each sync."""
    engine = launch_server(DEFAULT_MODEL, tokenizer, engine="hf", timeout=120)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gcpo_fast.train",
        "--use_vllm", "--vllm_mode", "server", "--vllm_server_base_url", engine.base_url,
        "--vllm_group_port", str(engine.group_port), "--max_steps", "2", "--output_dir", str(out),
        "--learning_rate", "3e-3", "--warmup_ratio", "0", "--eval_steps", "0", "--save_steps", "0",
        "--per_device_train_batch_size", "16",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    try:
        env = {**env, "OMP_NUM_THREADS": "1", API_KEY_ENV: engine.api_key}  # the key launch_server gave the server
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        engine.close()
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["sampling/sampling_logp_difference/max"] < LOGP_TOL for m in lines), lines
    log = open(engine.log_path).read()
    assert log.count("POST /update_weights/") == 2 and log.count("POST /init_communicator/") == 1


def test_stop_strings_end_completions_as_in_process(engine, hf, tokenizer, prompt_ids):
    """Sampling.stop reaches the server (/generate/'s "stop"): the greedy rows end where the in-process engine's
    do, at the token that completes the first stop string (kept), not truncated."""
    sampling = Sampling(32, greedy=True, stop=(". ", "=7"))
    local = HFEngine(hf, tokenizer).generate(prompt_ids, 1, sampling)
    served = engine.generate(prompt_ids, 1, sampling)
    assert served.completion_ids == local.completion_ids and served.truncated == local.truncated
    assert not any(local.truncated) and all(". " in t or "=7" in t for t in local.texts)
    whole = HFEngine(hf, tokenizer).generate(prompt_ids, 1, Sampling(32, greedy=True))
    assert all(len(a) < len(b) for a, b in zip(local.completion_ids, whole.completion_ids))


def test_the_trainers_own_server_wants_its_key(engine):
    request = urllib.request.Request(engine.base_url + "/info/")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(request, timeout=10)
    command_line = open(f"/proc/{engine.process.pid}/cmdline").read()
    assert engine.api_key not in command_line and "127.0.0.1" in command_line  # the key travels in its environment


def test_a_stalled_update_never_blocks_generation(engine, hf, prompt_ids):
    """A client that sends one tensor of an update and goes silent: generations go on meanwhile (the stream arrives
    off the engine lock); the update, when it ends without the rest, is refused and nothing of it is loaded."""
    resume = threading.Event()
    errors = []

    def stalling(named):
        for i, item in enumerate(named):
            if i == 1:
                resume.wait(120)
                return  # the stream ends without the rest
            yield item

    def update():
        try:
            engine.sync_weights(stalling((n, t * 0) for n, t in hf.named_parameters()), version=99)
        except TrainingError as e:
            errors.append(str(e))

    updating = threading.Thread(target=update)
    updating.start()
    try:
        time.sleep(2)  # the first tensor has gone; the update waits for the rest
        start = time.monotonic()
        status, out = post(engine, "/generate/", dict(prompts=prompt_ids[:2], n=2, max_tokens=8))
        assert status == 200 and out["policy_version"] != 99
        assert time.monotonic() - start < 10, "a generation waited for a stalled update"
    finally:
        resume.set()
        updating.join(60)
    assert len(errors) == 1 and re.search(r"HTTP 400: the update does not match .* it lacks \d+ of", errors[0])
    sampling = Sampling(max_completion_length=16, temperature=1.0)
    assert worst_gap(hf, engine.generate(prompt_ids[:2], 2, sampling), 1.0) < LOGP_TOL  # nothing was loaded
    engine.sync_weights(hf.named_parameters(), version=100)  # the next sync forms a new group and goes through


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory, tokenizer):
    """The shipped model's architecture with one layer more (random weights): names and shapes that include the
    shipped model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("five_layers")
    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    config.num_hidden_layers, config.layer_types = 5, ["full_attention"] * 5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_server_of_another_model_refuses_the_trainers_weights(five_layers, tokenizer, hf, prompt_ids):
    engine = launch_server(five_layers, tokenizer, engine="hf", timeout=120)
    try:
        greedy = Sampling(max_completion_length=8, greedy=True)
        before = engine.generate(prompt_ids[:2], 1, greedy).completion_ids
        with pytest.raises(TrainingError) as error:
            engine.sync_weights(hf.named_parameters(), version=1)
        message = one_line(error)
        assert re.search(r"HTTP 400: the update does not match this server's model .* it lacks 12 of", message)
        assert "of this server's 62 parameters (model.layers.4." in message, message
        assert "model.layers.4." in message, message
        after = engine.generate(prompt_ids[:2], 1, greedy)
        assert after.completion_ids == before and after.policy_version == [0, 0]  # none of it was loaded
        sixth = {**dict(hf.named_parameters()), "model.layers.9.mlp.up_proj.weight": torch.zeros(512, 128)}
        with pytest.raises(TrainingError, match=r"has no parameter 'model.layers.9.mlp.up_proj.weight'"):
            engine.sync_weights(sixth.items(), version=2)
        reshaped = {n: t[:, :64] if n.endswith("layers.0.mlp.up_proj.weight") else t for n, t in hf.named_parameters()}
        with pytest.raises(TrainingError, match=r"has 'model.layers.0.mlp.up_proj.weight' of shape \[512, 128\], not"):
            engine.sync_weights(reshaped.items(), version=3)
    finally:
        engine.close()


def test_a_second_trainer_takes_the_server_and_the_first_is_told_in_one_line(engine, hf, tokenizer):
    """Two trainers sending weights to one server: the newest /init_communicator/ wins (a restarted trainer takes
    its server back), and the first trainer's next update is refused with the reason, not gloo's words."""
    first, second = engine, RemoteEngine(engine.base_url, tokenizer, api_key=engine.api_key, group_port=free_port())
    try:
        first.sync_weights(hf.named_parameters(), version=1)
        second.sync_weights(hf.named_parameters(), version=2)  # takes the server
        with pytest.raises(TrainingError) as refused:
            first.sync_weights(hf.named_parameters(), version=3)
        assert "another trainer took this server" in str(refused.value) and "\n" not in str(refused.value)
        second.sync_weights(hf.named_parameters(), version=4)  # the second goes on
        assert first.group is None  # and the first, told, would form a new group only if asked again
    finally:
        second.close()
        first.sync_weights(hf.named_parameters(), version=5)  # the module's engine takes its server back
