"""retention: the student's score as a fraction of the teacher's.

Part of kd_plugins (kd_plugins/metrics); load offline with ``kd_plugins.metrics.load("retention")`` or
``evaluate.load("<path>/retention.py")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Retention of a distilled student relative to its teacher. Each example is one paired score: the student's
(prediction) and the teacher's (reference) on the same item, task or benchmark. Scores are averaged first, then
compared:

* higher-is-better scores (accuracy, exact match, win rate): retention = mean(student) / mean(teacher);
* lower-is-better scores (perplexity, loss; ``higher_is_better=False``): retention = mean(teacher) / mean(student).

So in both cases 1.0 means the student matches the teacher and values below 1.0 mean it falls short. For
perplexity pass the corpus-level perplexities (one example: ``predictions=[student_ppl],
references=[teacher_ppl]``), not per-sentence values, since the mean of per-sentence perplexities is not the
corpus perplexity.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: student scores (float).
    references: teacher scores (float), paired with predictions.
    higher_is_better: True for accuracy-like scores (default), False for perplexity-like scores.
Returns:
    retention: the ratio above (nan if the denominator is 0).
    student: mean student score.  teacher: mean teacher score.
Example:
    >>> metric = kd_plugins.metrics.load("retention")
    >>> metric.compute(predictions=[0.6], references=[0.8])
    {'retention': 0.75, 'student': 0.6, 'teacher': 0.8}
    >>> metric.compute(predictions=[12.0], references=[9.0], higher_is_better=False)
    {'retention': 0.75, 'student': 12.0, 'teacher': 9.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retention(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references, higher_is_better=True):
        if len(predictions) == 0:
            raise ValueError("retention: no scores given")
        student = float(np.mean(np.asarray(predictions, dtype=np.float64)))
        teacher = float(np.mean(np.asarray(references, dtype=np.float64)))
        numerator, denominator = (student, teacher) if higher_is_better else (teacher, student)
        value = numerator / denominator if denominator != 0 else float("nan")
        return {"retention": value, "student": student, "teacher": teacher}
