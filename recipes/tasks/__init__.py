"""The retention suite's multiple-choice tasks: lm-evaluation-harness task YAMLs and their local JSONL data.

``build_tasks`` rebuilds ``data/*.jsonl`` from evaluation-only text (see ``README.md`` in this folder for the
sources and licences); :mod:`kd_plugins.recipes.retention` runs them through ``lm_eval.simple_evaluate``.
"""
