"""Hub dataset names (--dataset openai/gsm8k --dataset_config main): read with the datasets library from the local
Hugging Face caches only, the hub cache that `hf download --repo-type dataset` fills and the datasets cache an
earlier `datasets.load_dataset(NAME, CONFIG)` left; one line saying nothing is downloaded when it is in neither.
The caches are built here as those commands leave them (the files of the repository, and the arrow files written
by datasets' own Parquet builder); nothing is downloaded."""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_model import child_env, make_tiny_model

from gcpo_fast.data.sources import load_records

datasets = pytest.importorskip("datasets")

COMMIT = "0123abcd" * 5
README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def gsm8k_rows(n: int) -> list[dict]:
    """GSM8K's columns: the question, and the worked answer ending in `#### x`."""
    return [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}.\n#### {i + 2}"} for i in range(n)]


def hub_cache(root) -> None:
    """root/hub: someone/math as `hf download --repo-type dataset someone/math` leaves it (files, refs/main)."""
    repo = root / "hub" / "datasets--someone--math"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "main").mkdir(parents=True)
    (snapshot / "README.md").write_text(README)
    pq.write_table(pa.Table.from_pylist(gsm8k_rows(12)), snapshot / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(gsm8k_rows(5)), snapshot / "main" / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def datasets_cache(root) -> None:
    """root/datasets: what load_dataset("someone/math", "main") leaves in the datasets cache: the arrow files and
    dataset_info.json its Parquet builder writes, in the folder of the repository's name and configuration
    (someone___math/main/0.0.0/<hash>/; the builder is run on local files, so its folder is renamed to that)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    for split, n in (("train", 12), ("test", 5)):
        pq.write_table(pa.Table.from_pylist(gsm8k_rows(n)), root / f"{split}.parquet")
    files = {split: str(root / f"{split}.parquet") for split in ("train", "test")}
    builder = Parquet(cache_dir=str(root / "build"), dataset_name="math", config_name="main", data_files=files)
    builder.download_and_prepare()
    target = root / "datasets" / "someone___math" / "main" / "0.0.0" / COMMIT
    shutil.copytree(builder.cache_dir, target, ignore=shutil.ignore_patterns("*.lock"))


GSM8K_COLUMNS = dict(prompt_column="question", golden_column="answer")


def test_a_hub_dataset_trains_from_the_hub_cache_offline(tmp_path):
    hub_cache(tmp_path)
    make_tiny_model(tmp_path / "model")
    env = {**child_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "gcpo_fast.train", "--model", str(tmp_path / "model"), "--dataset", "someone/math"]
    cmd += ["--dataset_config", "main", "--prompt_column", "question", "--golden_column", "answer"]
    cmd += ["--eval_dataset", "someone/math", "--eval_steps", "1", "--eval_num_problems", "5"]
    cmd += ["--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length", "8"]
    cmd += ["--max_steps", "1", "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["eval/num_problems"] == 5  # the test split of the same configuration
    assert metrics[-1]["step"] == 1


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Both caches of the process pointed into tmp_path (empty until a test fills one)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return tmp_path


def test_a_hub_dataset_loads_from_the_datasets_cache(caches):
    datasets_cache(caches)
    train = load_records("someone/math", split="train", dataset_config="main", **GSM8K_COLUMNS)
    test = load_records("someone/math", split="test", **GSM8K_COLUMNS)  # the only configuration: no name needed
    assert [len(train), len(test)] == [12, 5]
    assert (
        train[3]["prompt"] == "What is 3 + 2?" and train[3]["answer"] == "5" and train[3]["golden"].endswith("#### 5")
    )
    assert datasets.config.HF_HUB_OFFLINE is False or datasets.config.HF_HUB_OFFLINE  # (restored, whatever it was)


@pytest.mark.parametrize(
    "config, split, message",
    [
        ("socratic", "train", r"someone/math: BuilderConfig 'socratic' not found. Available: \['main'\]"),
        ("main", "validation", r"someone/math: Unknown split \"validation\". Should be one of \['train', 'test'\]"),
    ],
)
def test_an_unknown_configuration_or_split_is_one_line_naming_those_there_are(caches, config, split, message):
    hub_cache(caches)
    with pytest.raises(ValueError, match=f"^{message}"):
        load_records("someone/math", split=split, dataset_config=config, **GSM8K_COLUMNS)


def test_a_hub_dataset_in_no_cache_is_one_line_saying_nothing_is_downloaded(caches):
    with pytest.raises(ValueError) as e:
        load_records("someone/absent", **GSM8K_COLUMNS)
    assert str(e.value) == (
        "someone/absent: no such file or folder, nor a dataset in the local Hugging Face cache (nothing is downloaded "
        "at run time: `hf download --repo-type dataset someone/absent` first, or pass a .jsonl/.parquet file)"
    )
    with pytest.raises(ValueError, match="^data/absent.jsonl: no such file or directory$"):  # a path, not a name
        load_records("data/absent.jsonl")


def test_a_hub_dataset_without_the_datasets_library_is_one_line(caches, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an install without the data extra sees
    with pytest.raises(
        ValueError,
        match=r"^someone/math: no such file or folder; as a hub dataset it needs the datasets "
        r'library: pip install -e "\.\[data\]"$',
    ):
        load_records("someone/math", **GSM8K_COLUMNS)


def test_a_hub_cache_snapshot_without_its_data_files_says_so(caches):
    hub_cache(caches)  # then the data files go (`hf download --include README.md`, or a download cut short)
    for parquet in (caches / "hub").rglob("*.parquet"):
        parquet.unlink()
    with pytest.raises(ValueError, match=r"^someone/math: its files in the Hugging Face cache \(.*\) hold no data for"):
        load_records("someone/math", dataset_config="main", **GSM8K_COLUMNS)
