"""Stand-in ``dkd`` term used only while kd_plugins.components.logit has not landed (see conftest.py)."""

from __future__ import annotations

import torch

from kd_plugins.functional import normalize_token_sum, valid_mask
from kd_plugins.hookspecs import hookimpl
from kd_plugins.types import DistillationTerm, Requirements


class StandInKL(DistillationTerm):
    family = "logit"

    def __init__(self, temperature: float = 1.0, **_: object):
        super().__init__()
        self.temperature = temperature

    def requirements(self) -> Requirements:
        return Requirements(final_hidden=True)

    def forward(self, student, teacher, batch):
        zs = (student.final_hidden @ student.lm_head_weight.T).float() / self.temperature
        zt = (teacher.final_hidden @ teacher.lm_head_weight.T).float() / self.temperature
        kl = (zt.log_softmax(-1).exp() * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1)
        return normalize_token_sum(kl, valid_mask(batch.labels), batch.num_items_in_batch)


@hookimpl
def register_logit_terms(register):
    register("dkd", lambda student, teacher, **options: StandInKL(**options))
