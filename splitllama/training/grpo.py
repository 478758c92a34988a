"""``task=grpo``: RL post-training of a split model with TRL's ``GRPOTrainer``, on a reward one can verify.

The task: complete the header of a held-out standard-library function. A prompt is the start of a
one-line ``def`` header as it stands in a module held out of the donors' training text (the
validation documents of the ``stdlib_source`` corpus, see
:func:`splitllama.data.in_validation`), up to and including ``def name(``. Two rewards,
summed:

- ``header_parses`` (1.0 or 0.0): the prompt and the completion's first line make a function
  header that Python parses (``ast.parse`` of that line with a ``pass`` body). Only the first line
  counts, so a completion cut at ``max_completion_length`` can still earn it. (A whole completion
  that parses, the obvious reward, was 0 for every sample of the embedded split model: 16 tokens
  of code are nearly always cut mid-statement.)
- ``parameter_match`` (0.0 to 1.0): when the header parses, the share of the real function's
  parameter names it has and no others (Jaccard of the two name sets; 1.0 for an exact match).

So the first reward is within reach of a model that has seen Python, the second rewards knowing
the library. Both are pure functions of the text: no model judges.

TRL logs every step (mean reward and per reward function, its spread, KL to the starting model
when ``task.grpo.beta`` > 0, completion lengths); :class:`TrainerLogForwarder` hands those to the
run's loggers (W&B offline, CSV), and :func:`train_grpo` returns them for ``results.json``.
"""

from __future__ import annotations

import ast
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: ``def name(`` at the start of a line (any indentation), with the header closed on the same line.
ONE_LINE_DEF = re.compile(r"^(?P<prompt>[ \t]*(?:async[ \t]+)?def[ \t]+[A-Za-z_]\w*\()(?P<rest>.*\):.*)$", re.MULTILINE)


@dataclass(frozen=True)
class HeaderPrompt:
    """A held-out function: the prompt (``def name(``), the rest of its real header line, its parameter names."""

    prompt: str
    answer: str
    parameters: tuple[str, ...]


def header_parameters(line: str) -> tuple[str, ...] | None:
    """Parameter names of the function header ``line`` (``None`` if it does not parse as one); a
    header with its body on the same line (``def f(): pass``) counts."""
    for source in (line.strip() + "\n    pass\n", line.strip()):
        try:
            tree = ast.parse(source)
            break
        except SyntaxError:
            continue
    else:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    args = tree.body[0].args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return tuple(names)


def header_prompts(documents: Sequence[str]) -> list[HeaderPrompt]:
    """The one-line function headers of ``documents`` as prompts, in order, each prompt once: a
    prompt that starts several different headers (``    def __init__(``) has no one answer, so it is left out."""
    found: dict[str, HeaderPrompt | None] = {}
    for text in documents:
        for match in ONE_LINE_DEF.finditer(text):
            parameters = header_parameters(match.group(0))
            if parameters is None:
                continue
            prompt = HeaderPrompt(match.group("prompt"), match.group("rest"), parameters)
            if prompt.prompt in found and found[prompt.prompt] != prompt:
                found[prompt.prompt] = None
            else:
                found[prompt.prompt] = prompt
    return [p for p in found.values() if p is not None]


def _first_line(prompt: str, completion: str) -> str:
    return (prompt + completion).split("\n", 1)[0]


def header_parses(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where prompt + the completion's first line is a function header Python parses, else 0.0."""
    return [float(header_parameters(_first_line(p, c)) is not None) for p, c in zip(prompts, completions, strict=True)]


def parameter_match(prompts: list[str], completions: list[str], parameters: list[Sequence[str]], **_: Any) -> list[float]:
    """Jaccard similarity of the completed header's parameter names and the real ones (0.0 if it does not parse)."""
    scores = []
    for prompt, completion, real in zip(prompts, completions, parameters, strict=True):
        got = header_parameters(_first_line(prompt, completion))
        if got is None:
            scores.append(0.0)
            continue
        union = set(got) | set(real)
        scores.append(len(set(got) & set(real)) / len(union) if union else 1.0)
    return scores


#: ``task.grpo.rewards`` may list these (TRL calls each on every batch and sums them).
REWARDS = {"header_parses": header_parses, "parameter_match": parameter_match}


def held_out_header_prompts(documents: Sequence[str], val_fraction: float, count: int, eval_count: int,
                            seed: int) -> tuple[list[HeaderPrompt], list[HeaderPrompt]]:
    """Training and evaluation prompts (disjoint), drawn with ``seed`` from the headers of the
    documents held out at ``val_fraction``."""
    from ..data import in_validation

    pool = header_prompts([d for d in documents if in_validation(d, val_fraction)])
    if len(pool) < count + eval_count:
        from ..errors import RunConfigError

        raise RunConfigError(
            f"task.grpo.prompts={count} + task.grpo.eval_prompts={eval_count}: the held-out documents hold only "
            f"{len(pool)} one-line function headers; give task.grpo.prompts + task.grpo.eval_prompts <= {len(pool)} "
            f"(e.g. task.grpo.prompts={max(1, len(pool) - eval_count)}), or more documents (data.files)"
        )
    random.Random(seed).shuffle(pool)
    return pool[:count], pool[count:count + eval_count]


def prompt_dataset(prompts: Sequence[HeaderPrompt]) -> Any:
    """A ``datasets.Dataset`` with the columns TRL reads (``prompt``) and the rewards get (``parameters``)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p.prompt for p in prompts], "parameters": [list(p.parameters) for p in prompts]})


class TrainerLogForwarder:
    """A transformers ``TrainerCallback`` (built by :func:`log_forwarder`) that sends each of TRL's
    log rows to the run's Lightning loggers (``train/<key>``, ``eval/<key>``) and keeps them.

    The rows themselves go to Python logging at DEBUG (transformers' own printer, which dumped each as a dict on
    stdout, is removed: :func:`train_grpo`); at INFO a progress line every ``every`` steps, at the first and at
    the last (``max_steps``): the mean reward and its parts, KL, the time elapsed and left; and a line per
    evaluation. They land in Hydra's run.log and on stdout alike."""

    def __init__(self, loggers: list[Any], max_steps: int = 0, every: int = 0) -> None:
        self.loggers = loggers
        self.history: list[dict[str, float]] = []
        self.max_steps, self.every = max_steps, every
        self._started: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        import time

        self._started = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if not numbers:
            return
        step = state.global_step
        logger.debug("TRL's log at step %d: %s", step, numbers)
        self.history.append({"step": step, **numbers})
        renamed = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in numbers.items()}
        for lg in self.loggers:
            lg.log_metrics(renamed, step=step)
        if "eval_reward" in numbers:
            logger.info("grpo evaluation at step %d: %s", step, rewards_text(numbers, "eval_"))
        elif "reward" in numbers and self.every and (step == 1 or step % self.every == 0 or step >= self.max_steps):
            logger.info("%s", self.progress_line(step, numbers))

    def progress_line(self, step: int, row: dict[str, float]) -> str:
        import time

        from .callbacks import format_duration

        line = f"grpo step {step}/{self.max_steps} ({100 * step / max(self.max_steps, 1):.0f}%): {rewards_text(row)}"
        if self._started is not None:
            elapsed = time.perf_counter() - self._started
            line += f", {format_duration(elapsed)} elapsed"
            if 0 < step < self.max_steps:
                left = elapsed / step * (self.max_steps - step)
                line += f", about {format_duration(left)} left (ETA {time.strftime('%H:%M:%S', time.localtime(time.time() + left))})"
        return line


def rewards_text(row: dict[str, float], prefix: str = "") -> str:
    """``reward 0.651 (header parses 0.59, parameter match 0.06), KL 0.003`` from one of TRL's log rows."""
    parts = [f"{name.replace('_', ' ')} {row[key]:.2f}" for name in REWARDS
             if (key := f"{prefix}rewards/{name}/mean") in row]
    text = f"reward {row[prefix + 'reward']:.3f}" + (f" ({', '.join(parts)})" if parts else "")
    return text + (f", KL {row[prefix + 'kl']:.3g}" if prefix + "kl" in row else "")


def log_forwarder(loggers: list[Any], max_steps: int = 0, every: int = 0) -> Any:
    """:class:`TrainerLogForwarder` as a ``transformers.TrainerCallback`` (imported here, not at module import)."""
    from transformers import TrainerCallback

    class _Forwarder(TrainerLogForwarder, TrainerCallback):
        pass

    return _Forwarder(loggers, max_steps, every)


def train_grpo(model: Any, tokenizer: Any, train: Sequence[HeaderPrompt], evaluation: Sequence[HeaderPrompt], *,
               grpo: Any, optim: Any, max_steps: int, gradient_clip_val: float | None, seed: int, output_dir: str,
               loggers: list[Any], use_cpu: bool, progress_every: int = 0) -> list[dict[str, float]]:
    """Run TRL's ``GRPOTrainer`` on ``model`` for ``max_steps`` steps; returns TRL's log rows.

    ``grpo`` is ``task.grpo`` (rewards, group size, lengths, temperature, ``beta``); ``optim`` the
    run's optimiser group (AdamW with warmup and cosine decay to ``min_lr_ratio``). Each step
    samples ``num_generations`` completions for each of ``prompts_per_step`` prompts and updates
    once on them (on-policy). With ``beta`` > 0 TRL loads the reference model from
    ``model.config._name_or_path``: a saved directory. A progress line every ``progress_every`` steps
    (:class:`TrainerLogForwarder`; 0: none); TRL's raw rows go to logging at DEBUG, not to stdout.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    forwarder = log_forwarder(loggers, max_steps, progress_every)
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=grpo.prompts_per_step * grpo.num_generations,
        num_generations=grpo.num_generations,
        steps_per_generation=1,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        reward_weights=[float(w) for w in grpo.reward_weights] if grpo.reward_weights else None,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        warmup_steps=optim.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        max_grad_norm=gradient_clip_val if gradient_clip_val else 0.0,
        logging_steps=1,
        eval_strategy="steps" if evaluation and grpo.eval_every else "no",
        eval_steps=grpo.eval_every or None,
        per_device_eval_batch_size=grpo.prompts_per_step * grpo.num_generations,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[REWARDS[name] for name in grpo.rewards],
        args=args,
        train_dataset=prompt_dataset(train),
        eval_dataset=prompt_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        callbacks=[forwarder],
    )
    for printer in (PrinterCallback, ProgressCallback):  # each log row printed as a dict (disable_tqdm) or a bar
        trainer.remove_callback(printer)
    if evaluation and grpo.eval_every:
        trainer.evaluate()  # the starting point, logged at step 0
    trainer.train()
    if evaluation and grpo.eval_every and max_steps % grpo.eval_every:
        trainer.evaluate()  # the end point when the last step was not an evaluation step
    return forwarder.history


__all__ = [
    "REWARDS",
    "HeaderPrompt",
    "TrainerLogForwarder",
    "log_forwarder",
    "header_parameters",
    "header_parses",
    "header_prompts",
    "held_out_header_prompts",
    "parameter_match",
    "prompt_dataset",
    "rewards_text",
    "train_grpo",
]
