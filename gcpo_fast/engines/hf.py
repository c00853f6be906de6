"""HFEngine: rollouts from Hugging Face `generate` on the training model itself.

    from gcpo_fast.engines.hf import HFEngine

    engine = HFEngine(model, tokenizer, bf16=True)
    out = engine.generate(prompt_ids, 8, Sampling(256, temperature=1.0))     # gcpo_fast.engines.base.Rows

It generates all prompts x n rows in one batched `generate` with the KV cache and left padding. Its weights are
the trainer's, so its sync does nothing. With sampling_logprobs=True it also reports the log-probs each token was
sampled with (as the generation server's HF backend uses it, for a model that is not the trainer's).
"""

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from gcpo_fast.engines.base import Rows, Sampling, cut_at_stop, eos_token_ids
from gcpo_fast.models.loading import autocast


class HFEngine:
    """Rollouts from Hugging Face `generate` on the training model itself (bf16 autocast on CUDA when asked)."""

    asleep = False  # it never frees anything: the training model is the engine

    def __init__(self, model, tokenizer, *, bf16: bool = False, sampling_logprobs: bool = False):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        # with sampling_logprobs, Rows.sampling_logp: the log-softmax of the scores each token was drawn from,
        # after temperature / top-k / top-p (vLLM's processed_logprobs); for a model that is not the trainer's
        self.sampling_logprobs = sampling_logprobs
        self.eos_ids = eos_token_ids(model, tokenizer)  # fails now, not after a round, if nothing ends a completion

    def sync_weights(self, named_tensors, version: int = 0) -> None:
        """Nothing to do: this engine samples with the trainer's own weights."""

    def sleep(self) -> None:
        """Nothing to free (an engine with memory of its own releases it here while the trainer updates)."""

    def close(self) -> None:
        """Nothing to shut down."""

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> Rows:
        """n completions of every prompt, prompt-major rows. Runs the model in eval mode and restores its mode."""
        model, tokenizer, eos = self.model, self.tokenizer, self.eos_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        rows = [ids for ids in prompt_ids for _ in range(n)]
        width = max(len(ids) for ids in rows)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device)
        # A full GenerationConfig, so that sampling settings saved with the model (repetition penalty,
        # its own temperature) never leak into the rollouts: the loss assumes exactly these. top_k must be
        # 0, not None, to be off: transformers fills None with 50.
        options = (
            {}
            if sampling.greedy
            else dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        )
        config = GenerationConfig(
            max_new_tokens=sampling.max_completion_length,
            do_sample=not sampling.greedy,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            output_scores=self.sampling_logprobs,  # the processed scores (after temperature, top-k, top-p)
            return_dict_in_generate=True,
            **options,
        )
        stopping = StoppingCriteriaList(
            [GeneratedStopStrings(tokenizer, sampling.stop, width)] if sampling.stop else []
        )
        was_training = model.training
        model.eval()
        try:
            with autocast(self.bf16, device):
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                    stopping_criteria=stopping,
                )  # fmt: skip
        except RuntimeError as e:
            if "probability tensor contains" not in str(e):  # torch.multinomial's words for NaN/inf probabilities
                raise
            raise FloatingPointError(
                "sampling: the model's next-token probabilities are NaN or inf (its weights or activations overflowed)"
            ) from None
        finally:
            model.train(was_training)
        eos_set = set(eos)
        completions, truncated = [], []
        for ids in out.sequences[:, width:].tolist():
            ids, cut = cut_at_stop(ids, eos_set, sampling.stop, tokenizer)  # a finished row is padded after its end
            completions.append(ids)
            truncated.append(cut)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        logp = _sampled_logprobs(out.scores, out.sequences[:, width:], completions) if out.scores else None
        return Rows(rows, completions, truncated, texts, logp)


class GeneratedStopStrings(StoppingCriteria):
    """transformers' stop-string criterion over the generated tokens only (after the prompt's `width` columns), so
    that a row stops exactly where cut_at_stop cuts it, never on a stop string that spans the prompt's end."""

    def __init__(self, tokenizer, stop: tuple[str, ...], width: int):
        self.inner, self.width = StopStringCriteria(tokenizer, list(stop)), width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return self.inner(input_ids[:, self.width :], scores, **kwargs)


def _sampled_logprobs(scores, sampled: torch.Tensor, completions: list[list[int]]) -> list[list[float]]:
    """Per row, the log-prob of each kept token under the processed scores it was drawn from (fp32)."""
    # one step at a time: the scores of a step are [rows, vocab] (-inf where top-k / top-p cut), all steps
    # at once would be rows x new tokens x vocab
    chosen = torch.stack(
        [step.float().log_softmax(-1).gather(1, sampled[:, t, None])[:, 0] for t, step in enumerate(scores)], dim=1
    )
    return [row[: len(ids)] for row, ids in zip(chosen.tolist(), completions, strict=True)]
