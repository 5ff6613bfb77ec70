"""kl_to_teacher: mean KL(p_teacher || p_student) per token position.

Part of kd_plugins (kd_plugins/metrics); load offline with ``kd_plugins.metrics.load("kl_to_teacher")`` or
``evaluate.load("<path>/kl_to_teacher.py")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean forward KL divergence from the teacher's next-token distribution to the student's,
KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)), averaged over the positions given (natural log, nats).
One example is one token position: a row of V logits or log-probabilities. Rows are normalised with a
log-softmax, which leaves log-probabilities unchanged, so either form may be passed. Pass only valid positions
(e.g. ``logits[labels != -100]``).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: student rows, each V logits or log-probabilities.
    references: teacher rows, same form and length.
    temperature: divide logits by this before the softmax (default 1.0). Only meaningful for logits.
Returns:
    kl_to_teacher: mean KL(p_T || p_S) over positions, in nats (0.0 if no positions).
    num_positions: how many positions were averaged.
"""

_CITATION = """
@article{hinton2015distilling,
  title={Distilling the Knowledge in a Neural Network},
  author={Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal={arXiv preprint arXiv:1503.02531},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KlToTeacher(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references, temperature=1.0):
        if not temperature > 0:
            raise ValueError(f"kl_to_teacher: temperature must be > 0, got {temperature}")
        if len(predictions) == 0:
            return {"kl_to_teacher": 0.0, "num_positions": 0}
        student = np.asarray(predictions, dtype=np.float64) / temperature
        teacher = np.asarray(references, dtype=np.float64) / temperature
        if student.shape != teacher.shape:
            raise ValueError(f"kl_to_teacher: student rows {student.shape} and teacher rows {teacher.shape} differ")
        log_s = _log_softmax(student)
        log_t = _log_softmax(teacher)
        p_t = np.exp(log_t)
        # 0 * log 0 := 0 where the teacher puts no mass
        per_position = np.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)
        return {"kl_to_teacher": float(per_position.mean()), "num_positions": int(per_position.size)}


def _log_softmax(x):
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
