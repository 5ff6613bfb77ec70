"""top1_agreement: the fraction of positions where the student's top-1 token equals the teacher's.

Part of kd_plugins (kd_plugins/metrics); load offline with ``kd_plugins.metrics.load("top1_agreement")`` or
``evaluate.load("<path>/top1_agreement.py")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 agreement between a student and a teacher language model: over the positions given, the fraction where
argmax of the student's distribution equals argmax of the teacher's. One example is one token position.
Pass only valid positions (e.g. ``logits[labels != -100]``), or pass token ids with ``ignore_index`` marking
positions to skip.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the student, per position either a logit (or log-prob) row of length V, or its top-1 token id.
    references: the teacher, in the same form as predictions.
    ignore_index: with token ids, positions whose reference equals this value are skipped (default -100).
Returns:
    top1_agreement: fraction in [0, 1] of compared positions where the top-1 tokens agree (0.0 if none).
    num_positions: how many positions were compared.
Example:
    >>> metric = kd_plugins.metrics.load("top1_agreement")
    >>> metric.compute(predictions=[3, 5, 7], references=[3, 6, 7])
    {'top1_agreement': 0.6666666666666666, 'num_positions': 3}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top1Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Sequence(datasets.Value("float32")),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references, ignore_index=-100):
        student = np.asarray(predictions)
        teacher = np.asarray(references)
        if student.ndim == 2:  # logit rows: reduce to token ids
            if student.shape != teacher.shape:
                raise ValueError(
                    f"top1_agreement: student rows {student.shape} and teacher rows {teacher.shape} differ"
                )
            student, teacher = student.argmax(-1), teacher.argmax(-1)
        else:
            keep = teacher != ignore_index
            student, teacher = student[keep], teacher[keep]
        count = int(teacher.size)
        agreement = float((student == teacher).mean()) if count else 0.0
        return {"top1_agreement": agreement, "num_positions": count}
