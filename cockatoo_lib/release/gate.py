"""The champion/challenger gate: register the new model, score it beside the linear baseline
and the current champion on rows neither trained on, and move the `champion` alias only when it
wins.

The rules, on the run's test split and on the data config's holdout when it has one:
- the challenger's macro-F1 is above the linear baseline's on the same rows by more than
  `min_gain_over_baseline`, for every version, the first included, unless `allow_below_baseline`
  (a model its own evaluation says not to ship never answers as champion unless a user says so);
- the macro-F1 gain over the champion, on the labels both models know, is above
  `min_improvement` (a tie never replaces the champion);
- no such label's F1 drops by more than `max_label_drop`;
- the challenger knows every label the champion knows, unless `allow_label_change`;
- the champion was split by the same rule (else the test split may hold its training rows).
Both models score the raw prepared rows (each with its own tokenizer), so a champion of another
model type compares fairly. A paired bootstrap 95% interval of the macro-F1 gain is recorded.
A model already registered (the same weights) is not registered again: a cloned run whose
train step KFP took from its cache is judged as the version it already is.
Whatever the verdict, the version is tagged with which reduced forms (bf16, int8) may serve it
on a CPU (`serving_check`: at most MAX_SERVING_F1_DROP of test macro-F1 lost); `cockatoo serve`
reads the tags.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cockatoo_lib.data.prepare import HOLDOUT, read_manifest
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.metrics import bootstrap_gain, report, support
from cockatoo_lib.release.model_registry import CHAMPION, PREVIOUS, ModelRegistry, Registration, plan_params
from cockatoo_lib.storage.fileio import atomic_output_dir, check_output, read_json, write_json

log = logging.getLogger(__name__)

DECISION_JSON, DECISION_MD = "decision.json", "decision.md"
WEIGHTS_TAG = "weights_sha256"
# What a reduced form (bf16, int8) may cost, at most, in test macro-F1 for `cockatoo serve` to
# serve a version in it; each version is tagged serving_<form>=accepted|refused.
MAX_SERVING_F1_DROP = 0.005


def serving_tag(form: str) -> str:
    return f"serving_{form}"


@dataclass(frozen=True)
class GateRules:
    min_improvement: float = 0.0
    max_label_drop: float = 0.02
    allow_label_change: bool = False
    min_gain_over_baseline: float = 0.0
    allow_below_baseline: bool = False


def split_rows(data_dir: Path, split: str) -> dict | None:
    """A prepared split's texts, images, labels and label mask; None when it has no such split."""
    path = data_dir / f"{split}.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path)
    return {"text": table.column("text").to_pylist(),
            "images": table.column("image").to_pylist() if "image" in table.column_names else None,
            "y": np.asarray(table.column("labels").to_pylist(), dtype=np.int8),
            "m": np.asarray(table.column("label_mask").to_pylist(), dtype=np.int8)}


def _scores(classifier, rows: dict) -> np.ndarray:
    images = rows["images"] if classifier.image_processor is not None else None
    return classifier.predict_proba(rows["text"], images)


def compare(challenger, champion, rows: dict, rules: GateRules, name: str) -> dict:
    """Both models on one set of rows, over the labels both know; the rules' verdicts."""
    common = [x for x in champion.labels if x in challenger.labels]
    new_cols = [challenger.labels.index(x) for x in common]
    old_cols = [champion.labels.index(x) for x in champion.labels if x in common]
    data_cols = new_cols  # the prepared rows carry the challenger's labels
    y, m = rows["y"][:, data_cols], rows["m"][:, data_cols]
    new_probs, old_probs = _scores(challenger, rows)[:, new_cols], _scores(champion, rows)[:, old_cols]
    new_t, old_t = challenger.thresholds[new_cols], champion.thresholds[old_cols]
    new, old = report(new_probs, y, m, common, list(new_t)), report(old_probs, y, m, common, list(old_t))
    per_label = {x: {"challenger_f1": round(new["per_label"][x]["f1"], 6),
                     "champion_f1": round(old["per_label"][x]["f1"], 6),
                     "support": new["per_label"][x]["support"]} for x in common}
    gain = new["macro_f1"] - old["macro_f1"]
    drops = {x: round(v["champion_f1"] - v["challenger_f1"], 6) for x, v in per_label.items()
             if v["support"] > 0 and v["champion_f1"] - v["challenger_f1"] > rules.max_label_drop}
    reasons = []
    if not gain > rules.min_improvement:
        reasons.append(f"{name}: macro-F1 gain over the champion {gain:+.4f} is not above min_improvement "
                       f"{rules.min_improvement:g}")
    for label, drop in drops.items():
        reasons.append(f"{name}: F1 of {label} drops by {drop:.4f} (more than max_label_drop "
                       f"{rules.max_label_drop:g})")
    return {"rows": len(y), "labels": common, "supported_labels": int((support(y, m) > 0).sum()),
            "challenger_macro_f1": round(new["macro_f1"], 6), "champion_macro_f1": round(old["macro_f1"], 6),
            "macro_f1_gain": round(gain, 6),
            "gain_95_interval": bootstrap_gain(new_probs >= new_t, old_probs >= old_t, y, m),
            "per_label": per_label, "passed": not reasons, "reasons": reasons}


def registration(model_dir: Path, evaluation_dir: Path, data_manifest: dict, run_id: str,
                 digest: str) -> Registration:
    from cockatoo_lib.evaluation.evaluate import METRICS_FILE, kfp_metrics
    from cockatoo_lib.training.model_folder import read_model_manifest

    model = read_model_manifest(model_dir)
    results = read_json(evaluation_dir / METRICS_FILE, "evaluation metrics")
    scalars, _ = kfp_metrics(results)
    tags = {"kfp_run_id": run_id or "local", "data_fingerprint": data_manifest["fingerprint"],
            "model_type": model["model_type"], "base_model": model["base_model"],
            "labels": ",".join(model["labels"]), "split_rule": split_rule_tag(data_manifest),
            "test_macro_f1": f"{results['macro_f1']:.6f}", "plan": json.dumps(model["plan"], sort_keys=True),
            WEIGHTS_TAG: digest}
    if results.get("combination"):  # what is shipped, and each part alone
        parts = results["combination"]
        tags.update(transformer_weight=f"{parts['transformer_weight']:g}",
                    transformer_test_macro_f1=f"{parts['transformer']['macro_f1']:.6f}",
                    partner_test_macro_f1=f"{parts['partner']['macro_f1']:.6f}")
    return Registration(str(model_dir), tags, plan_params(model["plan"]), scalars,
                        model.get("validation_by_epoch", []), [str(evaluation_dir / METRICS_FILE)])


def split_rule_tag(data_manifest: dict) -> str:
    return json.dumps(data_manifest.get("split_rule"), sort_keys=True)


def promote(registry: ModelRegistry, model_name: str, model_dir: str | Path, data_dir: str | Path,
            evaluation_dir: str | Path, output: str | Path, run_id: str = "",
            rules: GateRules = GateRules()) -> dict:
    """Register the challenger (unless the same weights are registered already), decide, move the
    aliases; write decision.json and decision.md."""
    from cockatoo_lib.evaluation.evaluate import weights_digest

    check_output(output)
    model_dir, data_dir, evaluation_dir = Path(model_dir), Path(data_dir), Path(evaluation_dir)
    data_manifest = read_manifest(data_dir)
    digest = weights_digest(model_dir)
    _check_evaluation(evaluation_dir, model_dir, digest, data_dir, data_manifest)  # before any write
    known = registry.find_version(model_name, WEIGHTS_TAG, digest)
    if known is not None:
        log.info("gate: %s version %s holds these very weights: not registered again", model_name,
                 known.version)
        version = known.version
    else:
        version = registry.register(model_name, registration(model_dir, evaluation_dir, data_manifest, run_id,
                                                             digest)).version
    first = [] if known is None else [
        f"version {version} holds these very weights (registered before, e.g. by a run whose train step "
        "came from KFP's cache): not registered again"]
    try:
        decision = _decide(registry, model_name, version, digest, model_dir, data_dir, evaluation_dir,
                           data_manifest, rules, first)
    except BaseException as exc:  # the version stays registered; say why it has no verdict
        registry.tag_version(model_name, version, {"gate": "failed", "gate_reasons": str(exc)[:5000]})
        raise
    decision["registered"] = known is None
    if not decision["promoted"] and "already champion" not in decision["blocked_by"]:
        # A promoted version was tagged before its alias moved; the champion itself keeps its tags.
        registry.tag_version(model_name, version, _verdict_tags(decision))
    with atomic_output_dir(output) as tmp:
        write_json(tmp / DECISION_JSON, decision)
        (tmp / DECISION_MD).write_text(render_decision(decision))
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    log.info("gate: %s version %s %s: %s", model_name, version, verdict, "; ".join(decision["reasons"]))
    return decision


def _check_evaluation(evaluation_dir: Path, model_dir: Path, digest: str, data_dir: Path,
                      data_manifest: dict) -> None:
    """The evaluation is of this model (its weights digest) on this data (its fingerprint)."""
    from cockatoo_lib.evaluation.evaluate import METRICS_FILE

    results = read_json(evaluation_dir / METRICS_FILE, "evaluation metrics")
    fingerprint = data_manifest["fingerprint"]
    if results.get("weights_sha256") != digest or results.get("data_fingerprint") != fingerprint:
        what = ("data fingerprint" if results.get("weights_sha256") == digest else
                "weights digest" if "weights_sha256" in results else "weights digest (none recorded)")
        raise CockatooError(f"evaluation {evaluation_dir} is not of the model {model_dir} on the data "
                            f"{data_dir} ({what} differs); evaluate this model")


def _verdict_tags(decision: dict) -> dict[str, str]:
    """What the gate decided, on the version: servers read the serving_* tags once per version."""
    return {"gate": "promoted" if decision["promoted"] else "rejected",
            "gate_reasons": "; ".join(decision["reasons"])[:5000],
            **{serving_tag(form): "accepted" if checked["accepted"] else "refused"
               for form, checked in decision["serving"]["forms"].items()}}


def _decide(registry: ModelRegistry, model_name: str, version: str, digest: str, model_dir: Path,
            data_dir: Path, evaluation_dir: Path, data_manifest: dict, rules: GateRules,
            first_reasons: list[str]) -> dict:
    from cockatoo_lib.release.predict import Classifier

    champion_version = registry.by_alias(model_name, CHAMPION)
    decision = {"model_name": model_name, "registry": registry.uri, "challenger": version,
                "champion": champion_version.version if champion_version else None,
                "rules": asdict(rules), "sets": {}, "reasons": list(first_reasons), "blocked_by": []}
    challenger = Classifier(model_dir)
    decision["serving"] = serving_check(challenger, split_rows(data_dir, "test"))
    baseline = against_baseline(challenger, data_dir, evaluation_dir, data_manifest, rules)
    decision["baseline"] = baseline
    if not baseline["passed"]:
        decision["reasons"] += baseline["reasons"]
        if not baseline["overridden"]:
            decision["blocked_by"].append("baseline")
    if (challenger.combination or {}).get("transformer_weight") == 0:  # no allow_below_baseline for this
        decision["blocked_by"].append("partner alone")
        decision["reasons"].append("the combination gives the transformer weight 0: it would ship the char "
                                   "n-gram partner (the linear baseline) alone")
    if champion_version is None:
        decision["reasons"].append("no champion yet")
    elif champion_version.version == version:
        decision["blocked_by"].append("already champion")
        decision["reasons"].append(f"version {version} is the champion already")
    else:
        judged = _judge(registry, challenger, champion_version, data_dir, data_manifest, rules)
        decision["sets"] = judged["sets"]
        decision["reasons"] += judged["reasons"]
        decision["blocked_by"] += judged["blocked_by"]
    decision["promoted"] = not decision["blocked_by"]
    if not decision["promoted"]:
        return decision
    # MLflow has no compare-and-set on aliases: look again just before moving, so that a gate
    # beside this one (a manual rerun next to the weekly run) is not overwritten unseen.
    now = registry.by_alias(model_name, CHAMPION)
    if (now and now.version) != decision["champion"]:
        decision.update(promoted=False, blocked_by=["champion moved"], reasons=[
            f"the champion changed while the gate ran (now version {now.version if now else 'none'}, "
            f"scored against {decision['champion'] or 'none'}); rerun the gate to compare with it"])
        return decision
    # Every tag a server or a person reads is written before the alias moves, the last write.
    registry.tag_version(model_name, version, _verdict_tags(decision))
    # `previous` first: should the second move fail, the champion is still the old one. It names
    # the last champion that was a different model, never a copy of the new one.
    if champion_version is not None and champion_version.tags.get(WEIGHTS_TAG) != digest:
        registry.set_alias(model_name, PREVIOUS, champion_version.version)
    registry.set_alias(model_name, CHAMPION, version)
    return decision


def against_baseline(challenger, data_dir: Path, evaluation_dir: Path, data_manifest: dict,
                     rules: GateRules) -> dict:
    """The challenger beside the linear baseline: on the test split as its own evaluation scored
    both (the numbers its model card shows), and on the holdout, where the baseline is fitted on
    the train split as evaluate fits it."""
    from cockatoo_lib.evaluation.evaluate import METRICS_FILE

    results = read_json(evaluation_dir / METRICS_FILE, "evaluation metrics")  # of this model: promote checked
    sets = {"test": (results["macro_f1"], results["baseline"]["macro_f1"])}
    if HOLDOUT in data_manifest:
        seed = challenger.manifest.get("seed", 42)
        sets[HOLDOUT] = _holdout_beside_baseline(challenger, data_dir, data_manifest["labels"], seed)
    verdicts, reasons = {}, []
    for name, (model_f1, baseline_f1) in sets.items():
        margin = model_f1 - baseline_f1
        verdicts[name] = {"macro_f1": round(model_f1, 6), "baseline_macro_f1": round(baseline_f1, 6),
                          "margin": round(margin, 6), "passed": margin > rules.min_gain_over_baseline}
        if not verdicts[name]["passed"]:
            reasons.append(f"{name}: macro-F1 {model_f1:.4f} against the linear baseline's "
                           f"{baseline_f1:.4f} ({margin:+.4f}) is not above min_gain_over_baseline "
                           f"{rules.min_gain_over_baseline:g}"
                           + ("; promoted anyway: allow_below_baseline" if rules.allow_below_baseline
                              else ""))
    passed = all(v["passed"] for v in verdicts.values())
    return {"sets": verdicts, "passed": passed, "overridden": not passed and rules.allow_below_baseline,
            "reasons": reasons, "test_margin_95_interval": results.get("margin_95_interval"),
            "spillover": {k: v for k, v in results.get("spillover", {}).items() if v["share"] is not None}}


def serving_check(classifier, rows: dict) -> dict:
    """The model beside each reduced form `cockatoo serve` may run on a CPU (bf16, int8), all on
    the CPU, on the test rows at the model's thresholds: a form is accepted when it costs at most
    MAX_SERVING_F1_DROP of macro-F1."""
    from cockatoo_lib.release.predict import FORMS, Classifier

    full = classifier if classifier.device.type == "cpu" else Classifier(classifier.model_dir, device="cpu")
    probs = {form: _scores(full.in_form(form), rows) for form in FORMS}
    f1 = {form: report(p, rows["y"], rows["m"], full.labels, list(full.thresholds))["macro_f1"]
          for form, p in probs.items()}
    forms = {}
    for form in FORMS[1:]:
        drop = round(f1["fp32"] - f1[form], 6)  # the verdict follows the figure the decision shows
        forms[form] = {"macro_f1": round(f1[form], 6), "drop": drop, "accepted": drop <= MAX_SERVING_F1_DROP,
                       "max_probability_change": round(float(np.abs(probs["fp32"] - probs[form]).max()), 6)}
    return {"rows": len(rows["y"]), "macro_f1": round(f1["fp32"], 6), "max_drop": MAX_SERVING_F1_DROP,
            "forms": forms}


def _holdout_beside_baseline(challenger, data_dir: Path, labels: list[str], seed: int) -> tuple[float, float]:
    from cockatoo_lib.evaluation.baseline import baseline_probabilities

    rows = {split: split_rows(data_dir, split) for split in ("train", "validation", HOLDOUT)}
    holdout = rows[HOLDOUT]
    y, m = holdout["y"], holdout["m"]
    model = report(_scores(challenger, holdout), y, m, labels, list(challenger.thresholds))
    fitted_on = {s: (rows[s]["text"], rows[s]["y"], rows[s]["m"]) for s in ("train", "validation")}
    probs, thresholds, _ = baseline_probabilities(fitted_on, holdout["text"], seed)
    baseline = report(probs, y, m, labels, thresholds)
    return model["macro_f1"], baseline["macro_f1"]


def _judge(registry, challenger, champion_version, data_dir: Path, data_manifest: dict, rules) -> dict:
    from cockatoo_lib.release.predict import Classifier

    reasons, blocked = [], []
    if champion_version.tags.get("split_rule") != split_rule_tag(data_manifest):
        blocked.append("split rule")
        reasons.append("the champion was trained on data split by another rule (split_seed or "
                       "fractions changed), so this run's test split may hold its training rows; "
                       "promote by hand if intended")
    with tempfile.TemporaryDirectory(prefix="cockatoo-champion-") as work:
        champion = Classifier(registry.download(champion_version.uri, work))
        lost = [x for x in champion.labels if x not in challenger.labels]
        if lost and not rules.allow_label_change:
            blocked.append("label change")
            reasons.append(f"the challenger lacks label(s) the champion has: {', '.join(lost)} "
                           "(set allow_label_change to promote anyway)")
        if not [x for x in champion.labels if x in challenger.labels]:
            raise CockatooError("champion and challenger share no label; nothing to compare")
        sets = {"test": compare(challenger, champion, split_rows(data_dir, "test"), rules, "test")}
        if HOLDOUT in data_manifest:
            sets[HOLDOUT] = compare(challenger, champion, split_rows(data_dir, HOLDOUT), rules, HOLDOUT)
    for scored in sets.values():
        reasons += scored["reasons"]
        if scored["reasons"]:
            blocked.append("champion")
    if not blocked:
        reasons += [f"{name}: macro-F1 {s['challenger_macro_f1']:.4f} against the champion's "
                    f"{s['champion_macro_f1']:.4f} ({s['macro_f1_gain']:+.4f}), no label down by more than "
                    f"{rules.max_label_drop:g}" for name, s in sets.items()]
    return {"sets": sets, "reasons": reasons, "blocked_by": sorted(set(blocked), key=blocked.index)}


def render_decision(decision: dict) -> str:
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    rules = decision["rules"]
    lines = [f"# Gate: {decision['model_name']} version {decision['challenger']} {verdict}", "",
             f"Champion before: {decision['champion'] or 'none'}. Rules: min_gain_over_baseline "
             f"{rules['min_gain_over_baseline']:g}, allow_below_baseline {rules['allow_below_baseline']}, "
             f"min_improvement {rules['min_improvement']:g}, max_label_drop {rules['max_label_drop']:g}, "
             f"allow_label_change {rules['allow_label_change']}.", ""]
    if decision["blocked_by"]:
        lines += [f"Stopped by: {', '.join(decision['blocked_by'])}.", ""]
    lines += ["## Reasons", ""] + [f"- {r}" for r in decision["reasons"]]
    baseline = decision["baseline"]
    lines += ["", "## Against the linear baseline" + (" (overridden: allow_below_baseline)"
                                                       if baseline["overridden"] else ""),
              "", "| set | challenger macro-F1 | baseline macro-F1 | margin | passed |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['macro_f1']:.4f} | {v['baseline_macro_f1']:.4f} | {v['margin']:+.4f} | "
              f"{'yes' if v['passed'] else 'no'} |" for name, v in baseline["sets"].items()]
    if baseline.get("test_margin_95_interval"):
        low, high = baseline["test_margin_95_interval"]
        lines += ["", f"Test margin, paired bootstrap 95% interval: {low:+.4f} to {high:+.4f}."]
    if baseline.get("spillover"):
        lines += ["", "## Spillover on the test split", "",
                  "Rows of sources that do not annotate a label, flagged with it (no annotation says "
                  "whether they should be; the model card explains):", "",
                  "| label | rows not annotated | flagged | share |", "|---|---|---|---|"]
        lines += [f"| {x} | {v['rows']} | {v['flagged']} | {v['share']:.4f} |"
                  for x, v in baseline["spillover"].items()]
    for name, s in decision["sets"].items():
        low, high = s["gain_95_interval"]
        lines += ["", f"## Against the champion: {name} ({s['rows']} rows)", "",
                  f"Macro-F1: challenger {s['challenger_macro_f1']:.4f}, champion "
                  f"{s['champion_macro_f1']:.4f}, gain {s['macro_f1_gain']:+.4f} "
                  f"(paired bootstrap 95% interval {low:+.4f} to {high:+.4f}).",
                  "", "| label | challenger F1 | champion F1 | support |", "|---|---|---|---|"]
        lines += [f"| {x} | {v['challenger_f1']:.4f} | {v['champion_f1']:.4f} | {v['support']} |"
                  for x, v in s["per_label"].items()]
    serving = decision["serving"]
    lines += ["", "## Serving in a reduced form on a CPU", "",
              f"On the test split ({serving['rows']} rows), against macro-F1 {serving['macro_f1']:.4f} as "
              f"trained; a form is accepted when it costs at most {serving['max_drop']:g}. `cockatoo serve` "
              "on a CPU serves an accepted form its CPU runs natively.", "",
              "| form | macro-F1 | down | largest probability change | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {form} | {v['macro_f1']:.4f} | {v['drop']:.4f} | {v['max_probability_change']:.4f} | "
              f"{'accepted' if v['accepted'] else 'refused'} ({serving_tag(form)}) |"
              for form, v in serving["forms"].items()]
    return "\n".join(lines) + "\n"
