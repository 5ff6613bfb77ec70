"""Every hook kd_plugins calls, with its contract.

This module is the map of the extension surface. Hooks are called with keyword arguments only, so an
implementation may accept any subset of a spec's arguments, and specs may grow new arguments without
breaking existing plugins. No argument is ever removed.

Groups:

* **Contribution hooks** (``register_*``) are called once, when a component registry is built. Each receives a
  ``register`` callback; call it once per component you provide. Built-in components use exactly these hooks.
* **Observation hooks** (``kd_*``) are called while training runs. Their return values are ignored.

A plugin is any object or module with functions decorated by :data:`kd_plugins.hookimpl`. Third-party
packages expose one through the ``kd_plugins`` entry-point group::

    [project.entry-points.kd_plugins]
    my_terms = "my_package.kd_plugin"
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "kd_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- contribution hooks -------------------------------------------------------------------------------------


@hookspec
def register_logit_terms(register):
    """Contribute logit-level (decoupling) transfer terms.

    :param register: ``register(name, builder)``. ``name`` is the key users write in a config
        (``terms: [{name: ...}]``): lowercase letters, digits and ``_``. ``builder`` is called as
        ``builder(student=ModelInfo, teacher=ModelInfo, **options)`` and returns a
        :class:`kd_plugins.DistillationTerm` whose ``forward(student, teacher, batch)`` reads the final hidden
        states and LM heads from the captures.
    :return: ignored.

    The term's declared traits are how a host plans a step with it (:func:`kd_plugins.plan_step`; nothing else is
    read): ``normalizer`` (:class:`kd_plugins.Normalizer`, default ``BATCH``; a logit term that divides a token sum
    by ``batch.num_items_in_batch`` declares ``ITEMS``) and ``carries_task_loss`` (default False; True with
    ``forward_with_task_loss(student, teacher, batch, *, task_grad_ratio=None) -> (loss, ce)`` lets the host run
    the student's backbone only and take the CE from the term).

    Called once per registry build (not firstresult). Registering a name another plugin already registered
    raises :class:`kd_plugins.DuplicateComponentError` naming both providers.
    """


@hookspec
def register_alignment_terms(register):
    """Contribute representation-level (alignment) transfer terms.

    :param register: ``register(name, builder)`` with the same contract as in :func:`register_logit_terms`.
        Alignment terms declare the student/teacher layers they need through
        :meth:`kd_plugins.DistillationTerm.requirements`.
    :return: ignored.

    Declared traits as for logit terms: a token mean declares ``normalizer = Normalizer.TOKENS`` and divides by
    ``batch.num_tokens_in_batch`` (the valid tokens of the accumulation window, given only to ``TOKENS`` terms), so
    it is exact under gradient accumulation; the default ``BATCH`` is a per-micro-batch mean.
    """


@hookspec
def register_schedulers(register):
    """Contribute transfer-weight schedulers.

    :param register: ``register(name, builder)``. ``builder`` is called as
        ``builder(base_weights={term: weight}, **options)`` and returns a
        :class:`kd_plugins.WeightScheduler`.
    :return: ignored.

    Declared traits: ``reads_task_loss`` (default True; declare False when the weights never depend on the task
    loss, so that ``ce_weight: 0`` runs the student's backbone only), ``weights_in_advance(step)`` (default None;
    the step's weights when known before its losses, letting the host combine the fused CE gradient with the
    carrier term's), ``needs_gradients(step)`` and ``regularizer(*, step)``.
    """


# --- observation hooks --------------------------------------------------------------------------------------


@hookspec
def kd_distiller_built(distiller, config):
    """Called once after a :class:`kd_plugins.Distiller` has built its terms and scheduler.

    :param distiller: the new :class:`kd_plugins.Distiller` (an ``nn.Module``).
    :param config: the :class:`kd_plugins.KDConfig` it was built from.
    :return: ignored. Use it to inspect or wrap terms, or to log the configuration.
    """


@hookspec
def kd_step_end(step, total, losses, weights):
    """Called after the Distiller has combined the transfer terms of one step.

    :param step: the optimisation step (int) the weights were computed for.
    :param total: the weighted transfer loss (0-dim tensor, still attached to the graph; do not call
        ``backward`` on it).
    :param losses: ``{term_name: 0-dim tensor}``, unweighted, detached.
    :param weights: ``{term_name: float}`` as applied this step.
    :return: ignored.
    """
