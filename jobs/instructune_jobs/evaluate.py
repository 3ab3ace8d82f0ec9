"""Evaluation recipe: score the tuned model (and its base) and write the report to S3.

Read top to bottom, `run_evaluation` does:

1. locate the trained artifacts (`<checkpointing.uri>/final/adapter|model/` and `final/tokenizer/`)
   and the base model, downloading S3 prefixes to a temporary directory;
2. resolve the chat template exactly as training did (data.template.render_chat) and refuse to evaluate
   when its hash differs from the one the trained tokenizer (or the training manifest) carries:
   scores under another template say nothing about the model that will be served;
3. for each evaluation dataset: held-out loss and perplexity on assistant tokens only (the same
   tokenization and masking as training), then greedy, batched, left-padded generation on the
   prompts, scored by `scoring` (jsonValid, jsonSchema, regex, exactMatch + per-field matches);
   the loss and perplexity of the validation split training set aside (`validation.*`: the very
   tokens the data step prepared, read from the file the manifest names);
4. the same for the base model when compare_to_base (an adapter is simply disabled, so the base
   costs no second copy of the weights);
5. the general probe's loss for tuned and base: `forgetting.*`;
6. the report (metrics, base metrics, template hash, per-sample outputs) to
   `<checkpointing.uri>/eval/report.json`, and a camelCase dict for status.evaluation.

Metric keys are flat: `<dataset>.loss|perplexity|jsonValid|jsonSchema|regex|exactMatch`,
`<dataset>.fieldMatch.<field>`, the same without the dataset prefix as the mean over datasets
(what a gate rule like `jsonValid` reads), `validation.loss|perplexity` and
`forgetting.probeLoss|lossIncrease|relativeLossIncrease`. All values are floats.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructune_jobs import scoring
from instructune_jobs.artifacts import ArtifactLayout, fetch_base_model
from instructune_jobs.config import TrainConfig
from instructune_jobs.data.collate import PaddingCollator
from instructune_jobs.data.pipeline import DataValidationError, read_any_format
from instructune_jobs.data.template import (
    TemplateMismatchError,
    render_chat,
    resolve_chat_template,
    split_for_generation,
    template_hash,
)
from instructune_jobs.data.tokenize import tokenize_conversations
from instructune_jobs.data.types import IGNORE_INDEX, SourcedConversation, TokenizedExample
from instructune_jobs.generation import DEFAULT_BATCH_SIZE, Generation, batches, generate
from instructune_jobs.models import (
    TrainedArtifacts,
    load_causal_lm,
    load_tokenizer,
    load_tuned_model,
    locate_trained_artifacts,
)
from instructune_jobs.storage import ObjectReader, SchemeReader, Storage

log = logging.getLogger("instructune.evaluate")


# ---------------------------------------------------------------------------------------------
# Locating the trained weights and checking their template
# ---------------------------------------------------------------------------------------------


def materialize(uri: str, scratch: Path, storage: Storage) -> Path:
    """A local directory holding what uri names: local paths as they are, S3 prefixes downloaded."""
    if uri.startswith("s3://"):
        dest = Path(tempfile.mkdtemp(dir=scratch))
        storage.download_prefix(uri, dest)
        return dest
    path = Path(uri.removeprefix("file://"))
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {uri}")
    return path


def check_template(template: str, tokenizer: Any, artifacts: TrainedArtifacts | None) -> str:
    """The hash of the template evaluation renders with, after checking it against what training
    recorded (the trained tokenizer's chat_template, and the manifest's templateHash if any)."""
    digest = template_hash(template)
    recorded: dict[str, str] = {}
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):
        own = own.get("default")
    if own and artifacts is not None and artifacts.tokenizer_dir is not None:
        recorded["trained tokenizer"] = template_hash(str(own))
    if artifacts is not None:
        for key in ("templateHash", "template_hash"):
            if isinstance(artifacts.manifest.get(key), str):
                recorded["training manifest"] = artifacts.manifest[key]
            elif isinstance(artifacts.manifest.get("data"), dict) and key in artifacts.manifest["data"]:
                recorded["training manifest"] = artifacts.manifest["data"][key]
    for where, expected in recorded.items():
        if expected != digest:
            raise TemplateMismatchError(
                f"evaluation would render with chat template {digest[:12]} but the {where} has "
                f"{expected[:12]}: scores under another template do not describe the served model"
            )
    return digest


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def mean_assistant_loss(
    model: Any, examples: Sequence[TokenizedExample], pad_token_id: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[float, int]:
    """(mean cross-entropy per assistant token, number of those tokens). Token-weighted over the
    whole set, like the training loss, so long and short answers count by their tokens."""
    import torch

    if not examples:
        return math.nan, 0
    device = next(model.parameters()).device
    collate = PaddingCollator(pad_token_id)
    # Sorting by length keeps padding (wasted compute) small; the sum does not depend on order.
    ordered = sorted(examples, key=len)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for chunk in batches(ordered, batch_size):
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Token t predicts token t+1, exactly as the model's own loss shifts it.
            shift_logits = logits[:, :-1, :].float()
            shift_labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            tokens += int((shift_labels != IGNORE_INDEX).sum().item())
    return (total / tokens if tokens else math.nan), tokens


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str
    uri: str
    conversations: list[SourcedConversation]
    examples: list[TokenizedExample]  # for the loss
    prompts: list[str]  # rendered with the generation prompt, at most max_samples
    references: list[str]
    prompt_messages: list[list[dict[str, str]]]
    rows: int = 0
    invalid_rows: int = 0
    skipped_for_length: int = 0
    etags: dict[str, str] = field(default_factory=dict)


def prepare_eval_set(
    name: str,
    uri: str,
    cfg: TrainConfig,
    tokenizer: Any,
    template: str,
    reader: ObjectReader,
    max_samples: int | None,
    with_prompts: bool,
) -> EvalSet:
    """Conversations of an evaluation (or probe) source, tokenized for the loss exactly as for
    training, and the first max_samples prompts rendered for generation."""
    read = read_any_format(uri, reader, cfg.dataset.field_mapping, cfg.template.system_prompt)
    if not read.conversations:
        # A gate must not pass (or fail) on metrics of nothing.
        raise DataValidationError(f"evaluation source {uri} has no valid rows", read.invalid, read.rows)
    examples, rejected = tokenize_conversations(
        read.conversations, tokenizer, template, cfg.training.max_seq_length
    )
    eval_set = EvalSet(
        name,
        uri,
        read.conversations,
        examples,
        [],
        [],
        [],
        read.rows,
        len(read.invalid),
        len(rejected),
        read.etags,
    )
    if with_prompts:
        for conversation in read.conversations[:max_samples]:
            prompt_messages, reference = split_for_generation(conversation.messages)
            eval_set.prompts.append(
                render_chat(tokenizer, prompt_messages, template, add_generation_prompt=True)
            )
            eval_set.references.append(reference)
            eval_set.prompt_messages.append(prompt_messages)
    return eval_set


@dataclass
class ModelScores:
    metrics: dict[str, float]
    outputs: dict[str, list[Generation]]  # dataset -> generations
    samples: dict[str, list[dict[str, Any]]]  # dataset -> per-sample scores


def score_model(
    model: Any,
    tokenizer: Any,
    eval_sets: Sequence[EvalSet],
    probe: EvalSet | None,
    spec: scoring.MetricSpec,
    want_loss: bool,
    max_new_tokens: int,
    batch_size: int,
    validation: Sequence[TokenizedExample] = (),
) -> ModelScores:
    """Every metric of one model (tuned or base) on every evaluation set, plus its loss on the
    validation split and on the probe."""
    result = ModelScores({}, {}, {})
    if validation:
        loss, _tokens = mean_assistant_loss(model, validation, tokenizer.pad_token_id, batch_size)
        result.metrics["validation.loss"] = float(loss)
        result.metrics["validation.perplexity"] = (
            scoring.perplexity(loss) if math.isfinite(loss) else math.nan
        )
    for eval_set in eval_sets:
        prefix = eval_set.name
        if want_loss:
            loss, _tokens = mean_assistant_loss(model, eval_set.examples, tokenizer.pad_token_id, batch_size)
            result.metrics[f"{prefix}.loss"] = float(loss)
            result.metrics[f"{prefix}.perplexity"] = (
                scoring.perplexity(loss) if math.isfinite(loss) else math.nan
            )
        if spec.needs_generation:
            started = time.monotonic()
            outputs = generate(model, tokenizer, eval_set.prompts, max_new_tokens, batch_size)
            log.info(
                "generated %d responses for %s in %.1fs", len(outputs), prefix, time.monotonic() - started
            )
            per_sample = [
                scoring.score_sample(out.text, ref, spec)
                for out, ref in zip(outputs, eval_set.references, strict=True)
            ]
            for key, value in scoring.aggregate_scores(per_sample, spec).items():
                result.metrics[f"{prefix}.{key}"] = value
            result.outputs[prefix] = outputs
            result.samples[prefix] = [s.as_dict() for s in per_sample]
    if probe is not None:
        loss, _tokens = mean_assistant_loss(model, probe.examples, tokenizer.pad_token_id, batch_size)
        result.metrics["forgetting.probeLoss"] = float(loss)
    return result


def validation_split(layout: ArtifactLayout, storage: Storage) -> list[TokenizedExample]:
    """The validation split of the training run whose manifest is under the root (none when the
    run set none aside, or when the model was not trained here)."""
    from instructune_jobs.prepare import read_validation

    manifest = json.loads(storage.read_bytes(layout.manifest) or b"{}")
    uri = (manifest.get("data") or {}).get("preparedUri")
    if not uri or not (manifest.get("data") or {}).get("validationExamples"):
        return []
    try:
        return read_validation(uri, storage)
    except FileNotFoundError:
        # Prepared data of an older run whose data has changed since is pruned: no split to score.
        log.warning("the validation split at %s is gone: no validation.* metrics", uri)
        return []


def add_means_over_datasets(metrics: dict[str, float], dataset_names: Sequence[str]) -> dict[str, float]:
    """Unprefixed keys (`loss`, `jsonValid`, ...): the mean over datasets, for gate rules that
    should not depend on how many evaluation sets a tune names."""
    out = dict(metrics)
    suffixes: dict[str, list[float]] = {}
    for name in dataset_names:
        for key, value in metrics.items():
            if key.startswith(name + "."):
                suffixes.setdefault(key[len(name) + 1 :], []).append(value)
    for suffix, values in suffixes.items():
        out[suffix] = float(sum(values) / len(values))
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], uri: str, storage: Storage) -> str:
    body = json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")
    storage.write_bytes(uri, body, content_type="application/json")
    return uri


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    # JSON (and the CRD's number type) has no NaN: a metric that could not be computed (an empty
    # set) is left out rather than reported as a number that would pass or fail a gate by accident.
    return {k: float(v) for k, v in sorted(metrics.items()) if v is not None and math.isfinite(v)}


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


def run_evaluation(
    cfg: TrainConfig,
    model_dir_or_uri: str | Path | None = None,
    base_model_dir: str | Path | None = None,
    *,
    report_uri: str | None = None,
    reader: ObjectReader | None = None,
    storage: Storage | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    report_samples: int = 100,
) -> dict[str, Any]:
    """Evaluate the tuned model (default: `<checkpointing.uri>/final/`) against its base and write
    the report (default: `<checkpointing.uri>/eval/report.json`). Returns `{"metrics",
    "baseMetrics", "reportURI", "templateHash"}` for status.evaluation.

    model_dir_or_uri: a final/ directory or prefix (adapter/ or model/ + tokenizer/), or an adapter
    or model directory itself. base_model_dir: a local copy of the base model, to skip the download.
    """
    import torch

    started = time.monotonic()
    evaluation = cfg.evaluation
    names = [d.name for d in evaluation.datasets]
    if {"forgetting", "validation"} & set(names) or len(set(names)) != len(names):
        raise ValueError(
            f"evaluation dataset names must be unique, not 'forgetting' nor 'validation' (metric keys): {names}"
        )
    reader = reader or SchemeReader()
    storage = storage or Storage()
    torch.manual_seed(cfg.training.seed)
    local_parent = None
    if model_dir_or_uri is not None and not str(model_dir_or_uri).startswith("s3://"):
        # Without a configured root the report goes next to a local model's final/ directory.
        local_parent = str(Path(str(model_dir_or_uri).removeprefix("file://")).parent)
    layout = ArtifactLayout.for_config(cfg, fallback_root=local_parent)
    source = str(model_dir_or_uri or layout.final)
    report_uri = report_uri or layout.eval_report

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instructune-eval-")))
        artifacts = locate_trained_artifacts(materialize(source, scratch, storage), source)
        # The base weights are needed under an adapter, for baseMetrics and for the probe's baseline.
        needs_base = (
            artifacts.kind == "adapter" or evaluation.compare_to_base or evaluation.general_probe is not None
        )
        base_ref: Path | None = None
        base_revision: str | None = None
        if base_model_dir is not None:
            base_ref = Path(base_model_dir)
        elif needs_base:
            # Shared with training: cached per content on the node, hf:// at its pinned revision.
            fetched = fetch_base_model(cfg.base_model, storage)
            base_ref, base_revision = fetched.path, fetched.revision
        log.info("evaluating %s model from %s (base %s)", artifacts.kind, source, base_ref)

        tokenizer = load_tokenizer(artifacts.tokenizer_dir or base_ref or artifacts.weights_dir)
        template = resolve_chat_template(tokenizer, cfg.template.chat_template)
        digest = check_template(template, tokenizer, artifacts)

        spec = scoring.MetricSpec.from_config(evaluation.metrics)
        want_loss = any(metric.type == "loss" for metric in evaluation.metrics)
        eval_sets = [
            prepare_eval_set(
                d.name, d.uri, cfg, tokenizer, template, reader, evaluation.max_samples, spec.needs_generation
            )
            for d in evaluation.datasets
        ]
        probe = (
            prepare_eval_set(
                "probe", evaluation.general_probe.uri, cfg, tokenizer, template, reader, None, False
            )
            if evaluation.general_probe
            else None
        )

        validation = validation_split(layout, storage)
        model = load_tuned_model(artifacts, base_ref, cfg.training.precision)
        tuned = score_model(
            model,
            tokenizer,
            eval_sets,
            probe,
            spec,
            want_loss,
            evaluation.max_new_tokens,
            batch_size,
            validation,
        )
        base: ModelScores | None = None
        if base_ref is not None and (evaluation.compare_to_base or probe is not None):
            # The forgetting probe needs the base's probe loss even when compare_to_base is off.
            with base_model_context(model, artifacts, base_ref, cfg) as base_model:
                base_sets = eval_sets if evaluation.compare_to_base else []
                base = score_model(
                    base_model,
                    tokenizer,
                    base_sets,
                    probe,
                    spec,
                    want_loss,
                    evaluation.max_new_tokens,
                    batch_size,
                    validation if evaluation.compare_to_base else (),
                )
        del model

    metrics = add_means_over_datasets(tuned.metrics, names)
    base_metrics = add_means_over_datasets(base.metrics, names) if base and evaluation.compare_to_base else {}
    if probe is not None:
        base_probe = base.metrics.get("forgetting.probeLoss") if base else None
        metrics.update(scoring.forgetting_metrics(tuned.metrics["forgetting.probeLoss"], base_probe))
        if base_probe is not None:
            base_metrics["forgetting.probeLoss"] = base_probe
    metrics, base_metrics = _finite(metrics), _finite(base_metrics)

    report = {
        "kind": "InstructionTuneEvaluation",
        "createdAt": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tune": {"namespace": cfg.run.namespace, "name": cfg.run.name, "uid": cfg.run.uid},
        "model": {
            "source": source,
            "kind": artifacts.kind,
            "baseModel": cfg.base_model.uri,
            "baseModelRevision": base_revision,
        },
        "configHash": cfg.config_hash(),
        "templateHash": digest,
        "scoring": _SCORING_RULES,
        "metrics": metrics,
        "baseMetrics": base_metrics,
        "datasets": [_dataset_report(s, tuned, base, report_samples) for s in eval_sets],
        "validation": {"examples": len(validation)},
        "probe": None
        if probe is None
        else {"uri": probe.uri, "rows": probe.rows, "examples": len(probe.examples), "etags": probe.etags},
        "durationSeconds": round(time.monotonic() - started, 1),
    }
    write_report(report, report_uri, storage)
    log.info("evaluation report written to %s", report_uri)
    return {"metrics": metrics, "baseMetrics": base_metrics, "reportURI": report_uri, "templateHash": digest}


@contextlib.contextmanager
def base_model_context(
    tuned_model: Any, artifacts: TrainedArtifacts, base_ref: Path, cfg: TrainConfig
) -> Iterator[Any]:
    """The base model: the tuned PEFT model with its adapter (and modules_to_save) disabled, or,
    for full fine-tuning, the base weights loaded anew."""
    if artifacts.kind == "adapter":
        with tuned_model.disable_adapter():
            yield tuned_model
        return
    base = load_causal_lm(base_ref, cfg.training.precision)
    try:
        yield base
    finally:
        del base


_SCORING_RULES = {
    "jsonValid": "the whole response (surrounding whitespace aside) is one JSON object; prose, code fences, "
    "trailing text or a truncated object make it invalid",
    "jsonSchema": "jsonValid and the object satisfies the schema",
    "regex": "re.fullmatch of the pattern on the whitespace-stripped response",
    "exactMatch": "jsonValid and every named field equals the reference's value (JSON equality); "
    "without fields the whole response equals the reference",
    "loss": "mean cross-entropy per assistant token (training's masking), perplexity = exp(loss)",
}


def _dataset_report(
    eval_set: EvalSet, tuned: ModelScores, base: ModelScores | None, limit: int
) -> dict[str, Any]:
    samples = []
    outputs = tuned.outputs.get(eval_set.name, [])
    base_outputs = base.outputs.get(eval_set.name, []) if base else []
    for index in range(min(limit, len(outputs))):
        sample: dict[str, Any] = {
            "messages": eval_set.prompt_messages[index],
            "reference": eval_set.references[index],
            "output": outputs[index].text,
            "outputTokens": outputs[index].tokens,
            "scores": {**tuned.samples[eval_set.name][index], "hitMaxNewTokens": not outputs[index].stopped},
        }
        if base_outputs and base:
            sample["baseOutput"] = base_outputs[index].text
            sample["baseScores"] = {
                **base.samples[eval_set.name][index],
                "hitMaxNewTokens": not base_outputs[index].stopped,
            }
        samples.append(sample)
    return {
        "name": eval_set.name,
        "uri": eval_set.uri,
        "rows": eval_set.rows,
        "invalidRows": eval_set.invalid_rows,
        "lossExamples": len(eval_set.examples),
        "skippedForLength": eval_set.skipped_for_length,
        "generated": len(outputs),
        "etags": eval_set.etags,
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instructune_jobs.evaluate",
        description="Evaluate a tuned model (and its base) and write the report; prints the status dict as JSON.",
    )
    parser.add_argument(
        "--config-file", required=True, help="TrainConfig JSON (what the operator's ConfigMap holds)"
    )
    parser.add_argument(
        "--model",
        help="final/ prefix or directory, or an adapter/model directory "
        "(default: <checkpointing.uri>/final/)",
    )
    parser.add_argument(
        "--base-model-dir", help="local copy of the base model (default: download base_model.uri)"
    )
    parser.add_argument(
        "--report-uri", help="where to write report.json (default: <checkpointing.uri>/eval/)"
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    cfg = TrainConfig.from_json(Path(args.config_file).read_text())
    result = run_evaluation(
        cfg, args.model, args.base_model_dir, report_uri=args.report_uri, batch_size=args.batch_size
    )
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
