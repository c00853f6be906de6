"""ToolEngine: multi-turn rollouts that call tools, around any rollout engine (HF generate, vLLM, a server).

    from gcpo_fast.tools.loop import with_tools

    engine = with_tools(make_engine(...), cfg.tools, tokenizer)    # the engine itself when --tools is empty
    rows = engine.generate(prompt_ids, 8, sampling)                # engines.base.Rows, plus per row:
    rows.tool_mask[k]      # per completion token: 1 the model's, 0 a tool's output (context, never trained)
    rows.tool_use[k]       # ToolUse(calls, errors, timeouts, turns)

It is an engine like the others (gcpo_fast/engines/base.py), so the round, the evaluation, the teacher and the
rounds sampled ahead (--async_rollouts) use it unchanged. One generate():
1. the inner engine samples n completions of every prompt, told to stop at the tools' stop strings too
   (Sampling.stop: the python tool's "```output") besides EOS;
2. each row whose turn ended with a tool call (gcpo_fast/tools/formats.py) has its calls run in the sandbox, all
   rows' calls at once on a thread pool (--tool_workers), each in a process of its own; a row that ended at EOS,
   ran out of budget or made --max_tool_calling_iterations calls already (the next one is not run) is done and
   leaves the batch;
3. the output is tokenised once and appended to the row; the generated ids are never re-tokenised: the next turn's
   prompt is the prompt ids + the row's completion ids so far (model and tool tokens);
4. the inner engine samples one continuation of each row still going, with what is left of its budget
   (max_completion_length counts model and tool tokens together; a longer continuation is cut there and the row
   is truncated), and so on from 2 until no row is left.
Sampling log-probs (an engine that reports them) are kept per token, 0.0 on tool tokens (masked, so never read); a
row's policy_version is the oldest version among its turns.
"""

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gcpo_fast.engines.base import Rows, Sampling, ToolUse
from gcpo_fast.tools.formats import Call, ToolSet
from gcpo_fast.tools.options import ToolsConfig
from gcpo_fast.tools.sandbox import Sandbox


@dataclass
class Trajectory:
    """One row while it is sampled: its completion so far, token by token."""

    completion: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logp: list[float] | None = field(default_factory=list)
    version: int | None = None
    use: ToolUse = ToolUse()
    calls: list[Call] | None = None  # the calls its last turn ended with, to run
    truncated: bool = False
    done: bool = False

    def extend(self, ids: list[int], model: bool, logp: list[float] | None = None) -> None:
        self.completion += ids
        self.mask += [int(model)] * len(ids)
        if self.logp is not None:
            self.logp = None if model and logp is None else self.logp + (logp if model else [0.0] * len(ids))

    def finish(self, truncated: bool) -> None:
        self.done, self.truncated, self.calls = True, truncated, None


class ToolEngine:
    """A rollout engine whose completions may call tools (module docstring); everything else is the inner engine's."""

    def __init__(self, engine, tools: ToolSet, *, max_calls: int | None = None, workers: int = 4):
        self.engine, self.tools, self.max_calls = engine, tools, max_calls
        self.eos_ids = engine.eos_ids
        self.tool_schemas = tools.schemas  # what the prompts' chat template must be given (user tools)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tool-call")

    @property
    def asleep(self) -> bool:
        return self.engine.asleep

    def sync_weights(self, named_tensors, version: int = 0) -> None:
        self.engine.sync_weights(named_tensors, version=version)

    def sleep(self) -> None:
        self.engine.sleep()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.engine.close()

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling) -> Rows:
        sampling = dataclasses.replace(sampling, stop=tuple(dict.fromkeys(sampling.stop + self.tools.stop)))
        budget = sampling.max_completion_length
        first = self.engine.generate(prompt_ids, n, sampling)
        rows = [Trajectory(logp=[] if first.sampling_logp is not None else None) for _ in range(len(first))]
        self._take_turn(rows, list(range(len(rows))), first, budget)
        active = [k for k, row in enumerate(rows) if not row.done]
        while active:
            self._run_calls(rows, active, budget)
            active = [k for k in active if not rows[k].done]
            if not active:
                break
            left = max(budget - len(rows[k].completion) for k in active)
            prompts = [first.prompt_ids[k] + rows[k].completion for k in active]
            turn = self.engine.generate(prompts, 1, dataclasses.replace(sampling, max_completion_length=left))
            self._take_turn(rows, active, turn, budget)
            active = [k for k in active if not rows[k].done]
        completions = [row.completion for row in rows]
        return Rows(
            first.prompt_ids,
            completions,
            [row.truncated for row in rows],
            self.tools.tokenizer.batch_decode(completions, skip_special_tokens=True),
            None if any(row.logp is None for row in rows) else [row.logp for row in rows],
            policy_version=None if first.policy_version is None else [row.version for row in rows],
            tool_mask=[row.mask for row in rows],
            tool_use=[row.use for row in rows],
        )

    def _take_turn(self, rows: list[Trajectory], index: list[int], out: Rows, budget: int) -> None:
        """Append each row's new turn, cut to its budget, and decide what comes next: done, or its calls."""
        eos = set(self.eos_ids)
        for j, k in enumerate(index):
            row, ids = rows[k], out.completion_ids[j]
            room = budget - len(row.completion)
            cut = out.truncated[j] or len(ids) > room
            ids = ids[:room]
            row.extend(ids, model=True, logp=None if out.sampling_logp is None else out.sampling_logp[j][: len(ids)])
            if out.policy_version is not None:
                version = out.policy_version[j]
                row.version = version if row.version is None else min(row.version, version)
            if row.use.calls:
                row.use = dataclasses.replace(row.use, turns=row.use.turns + 1)
            if cut:
                row.finish(truncated=True)
                continue
            ended_at_eos = bool(ids) and ids[-1] in eos
            calls = self.tools.calls_in(self.tools.tokenizer.decode(ids), ended_at_eos)
            if calls is None:
                row.finish(truncated=False)
            elif self.max_calls is not None and row.use.calls >= self.max_calls:
                row.finish(truncated=not ended_at_eos)  # the call is not run: the rollout ends on it (TRL's rule)
            else:
                row.calls = calls

    def _run_calls(self, rows: list[Trajectory], index: list[int], budget: int) -> None:
        """Every pending call of these rows at once, each in the sandbox; outputs appended as tool tokens."""
        jobs = [(k, call) for k in index for call in rows[k].calls]
        results = list(self.pool.map(lambda job: self.tools.run(job[1]), jobs))
        for k in index:
            row = rows[k]
            mine = [r for (owner, _), r in zip(jobs, results) if owner == k]
            ids = self.tools.output_ids(row.calls, mine)
            row.use = ToolUse(
                calls=row.use.calls + len(mine),
                errors=row.use.errors + sum(r.status == "error" for r in mine),
                timeouts=row.use.timeouts + sum(r.status == "timeout" for r in mine),
                turns=row.use.turns,
            )
            room = budget - len(row.completion)
            row.extend(ids[:room], model=False)
            row.calls = None
            if len(ids) >= room:  # no room left for the model to read it and go on
                row.finish(truncated=True)


def with_tools(engine, options: ToolsConfig, tokenizer):
    """The engine with the run's tools (a ToolEngine), or the engine itself when --tools is empty."""
    if not options.enabled:
        return engine
    tools = ToolSet(options.tools, tokenizer, Sandbox(options.limits))
    return ToolEngine(engine, tools, max_calls=options.max_tool_calling_iterations, workers=options.tool_workers)
