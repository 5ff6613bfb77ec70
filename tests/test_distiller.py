"""The Distiller: building through the registry, combining, hooks, state. Uses in-test plugins so the
contract is tested independently of the built-in terms."""

import pytest
import torch
from torch import nn

import kd_plugins
from kd_plugins import (
    BatchContext,
    ConfigError,
    DistillationTerm,
    Distiller,
    HostFacts,
    KDConfig,
    ModelCapture,
    ModelInfo,
    Requirements,
    StudentMode,
    UnknownComponentError,
    WeightScheduler,
    hookimpl,
)

STUDENT = ModelInfo(hidden_size=6, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=3, vocab_size=11, name="student")
TEACHER = ModelInfo(hidden_size=8, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=4, vocab_size=11, name="teacher")


class ProjectedMSE(DistillationTerm):
    family = "alignment"

    def __init__(self, student_width, teacher_width, layer=-1):
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width)
        self.layer = layer

    def requirements(self):
        return Requirements(student_layers={STUDENT.resolve_layer(self.layer)}, teacher_layers={TEACHER.num_layers - 1})

    def forward(self, student, teacher, batch):
        s = self.proj(student.hidden_states[STUDENT.resolve_layer(self.layer)])
        t = teacher.hidden_states[TEACHER.num_layers - 1]
        per_token = ((s - t) ** 2).mean(-1)
        return kd_plugins.functional.normalize_token_sum(per_token, batch.token_mask)


class RecordingScheduler(WeightScheduler):
    def __init__(self, base_weights, every=1):
        super().__init__()
        self.base_weights = base_weights
        self.every = every
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.seen_gradients = []
        self.seen_losses = []

    def needs_gradients(self, step):
        return step % self.every == 0

    def weights(self, *, step, losses, gradients=None):
        self.calls += 1
        assert not any(v.requires_grad for v in losses.values()), "schedulers get detached losses"
        self.seen_losses.append({k: float(v) for k, v in losses.items()})
        if gradients is not None:
            self.seen_gradients.append({n: float(gradients.norm(n)) for n in gradients.names})
        return {k: self.base_weights[k] * 2.0 for k in losses}


class RecordingPlugin:
    def __init__(self):
        self.built = []
        self.steps = []

    @hookimpl
    def register_alignment_terms(self, register):
        def build(student, teacher, layer=-1):
            return ProjectedMSE(student.hidden_size, teacher.hidden_size, layer)

        register("test_mse", build)

    @hookimpl
    def register_schedulers(self, register):
        register("test_recording", RecordingScheduler)

    @hookimpl
    def kd_distiller_built(self, distiller, config):
        self.built.append((distiller, config))

    @hookimpl
    def kd_step_end(self, step, total, losses, weights):
        self.steps.append((step, float(total.detach()), dict(weights)))


@pytest.fixture
def plugin(clean_plugin_manager):
    p = RecordingPlugin()
    kd_plugins.get_plugin_manager().register(p, name="test_plugin")
    return p


def _captures(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = ModelCapture(info=STUDENT, hidden_states={1: torch.randn(2, 5, 6, generator=g, requires_grad=True)})
    teacher = ModelCapture(info=TEACHER, hidden_states={3: torch.randn(2, 5, 8, generator=g)})
    labels = torch.randint(0, 11, (2, 5), generator=g)
    batch = BatchContext.from_inputs(labels=labels, attention_mask=torch.ones(2, 5, dtype=torch.long), step=0)
    return student, teacher, batch


def test_combines_weighted_terms_and_calls_hooks(plugin):
    config = KDConfig(
        ce_weight=0.5,
        terms=[{"name": "test_mse", "weight": 0.3}, {"name": "test_mse", "label": "second", "weight": 0.1}],
        scheduler={"name": "test_recording"},
    )
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    assert plugin.built and plugin.built[0][0] is distiller
    student, teacher, batch = _captures()
    task = torch.tensor(2.0, requires_grad=True)
    out = distiller(student, teacher, batch, task_loss=task)
    expected_transfer = 0.6 * out.losses["test_mse"] + 0.2 * out.losses["second"]
    assert torch.allclose(out.transfer, expected_transfer)
    assert torch.allclose(out.loss, 0.5 * task + expected_transfer)
    assert out.weights == {"test_mse": pytest.approx(0.6), "second": pytest.approx(0.2)}
    assert plugin.steps and plugin.steps[0][0] == 0 and plugin.steps[0][2] == out.weights
    out.loss.backward()
    assert all(p.grad is not None for p in distiller.parameters())
    logs = out.log_dict()
    assert set(logs) >= {"kd/loss/test_mse", "kd/weight/second", "kd/transfer"}


def test_requirements_are_merged(plugin):
    config = KDConfig(terms=[{"name": "test_mse", "layer": 0}, {"name": "test_mse", "label": "b", "layer": -1}])
    req = Distiller(config, student=STUDENT, teacher=TEACHER).requirements()
    assert req.student_layers == {0, 1} and req.teacher_layers == {3}


def test_gradient_probe_only_on_requested_steps(plugin):
    config = KDConfig(terms=[{"name": "test_mse"}], scheduler={"name": "test_recording", "every": 2})
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    shared = nn.Parameter(torch.ones(6))
    for step in range(4):
        student, teacher, batch = _captures(step)
        student.hidden_states[1] = student.hidden_states[1] * shared  # make the shared parameter matter
        batch.step = step
        task = (shared**2).sum()
        distiller(student, teacher, batch, task_loss=task, shared_params=[shared])
    seen = distiller.scheduler.seen_gradients
    assert len(seen) == 2  # steps 0 and 2
    assert seen[0]["task"] == pytest.approx(float(2 * torch.ones(6).norm()))
    assert seen[0]["test_mse"] > 0


def _shared_step(distiller, shared, reduce, *, skip=False, seed=0):
    student, teacher, batch = _captures(seed)
    student.hidden_states[1] = student.hidden_states[1] * shared
    task = (shared**2).sum()
    if skip:
        return distiller.skip_transfer(batch, task_loss=task, shared_params=[shared], reduce=reduce)
    return distiller(student, teacher, batch, task_loss=task, shared_params=[shared], reduce=reduce)


def test_reduce_is_applied_to_the_schedulers_losses_and_probe_gradients(plugin):
    """``reduce`` (a cross-rank mean under DDP) reaches the scheduler: once on the stacked detached losses, once
    per probe gradient; the returned losses stay this rank's own."""
    config = KDConfig(terms=[{"name": "test_mse"}, {"name": "test_mse", "label": "b"}],
                      scheduler={"name": "test_recording"})
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    shared = nn.Parameter(torch.ones(6))
    calls = []

    def halve(tensor):
        calls.append(tuple(tensor.shape))
        return tensor / 2

    out = _shared_step(distiller, shared, halve)
    plain = _shared_step(distiller, shared, None)
    assert calls == [(2,), (6,), (6,), (6,)]  # losses, then test_mse, b, task gradients
    seen, seen_plain = distiller.scheduler.seen_losses
    assert seen == {k: pytest.approx(v / 2) for k, v in seen_plain.items()}
    grads, grads_plain = distiller.scheduler.seen_gradients
    assert grads == {k: pytest.approx(v / 2) for k, v in grads_plain.items()}
    assert {k: float(v) for k, v in out.losses.items()} == pytest.approx(seen_plain)


def test_skip_transfer_issues_the_same_collectives_as_forward(plugin):
    """A rank that skips the transfer terms (non-finite teacher) must still join every collective the other ranks
    issue, with zeros, and advance its scheduler on the reduced values -- or DDP deadlocks."""
    config = KDConfig(terms=[{"name": "test_mse"}, {"name": "test_mse", "label": "b"}],
                      scheduler={"name": "test_recording"})
    shared = nn.Parameter(torch.ones(6))
    issued = {}
    for role, skip in (("runs", False), ("skips", True)):
        distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
        calls = issued[role] = []

        def record(tensor, calls=calls):
            calls.append(tensor.clone())
            return torch.full_like(tensor, 3.0)  # the other ranks' mean

        _shared_step(distiller, shared, record, skip=skip)
        assert distiller.scheduler.seen_losses == [{"test_mse": 3.0, "b": 3.0}]
        assert distiller.scheduler.seen_gradients[0] == {k: pytest.approx(3.0 * 6**0.5) for k in ("test_mse", "b", "task")}
    assert [c.shape for c in issued["runs"]] == [c.shape for c in issued["skips"]]
    assert all(float(c.abs().sum()) == 0 for c in issued["skips"])
    assert _shared_step(Distiller(config, student=STUDENT, teacher=TEACHER), shared, None, skip=True) is None


def test_state_round_trip_and_mismatch(plugin):
    config = KDConfig(terms=[{"name": "test_mse"}], scheduler={"name": "test_recording"})
    a = Distiller(config, student=STUDENT, teacher=TEACHER)
    b = Distiller(config, student=STUDENT, teacher=TEACHER)
    a(*_captures())
    state = a.kd_state_dict()
    assert "scheduler.calls" in state and int(state["scheduler.calls"]) == 1
    b.load_kd_state_dict(state)
    for key, value in b.state_dict().items():
        assert torch.equal(value, state[key])
    other = Distiller(KDConfig(terms=[{"name": "test_mse", "label": "renamed"}]), student=STUDENT, teacher=TEACHER)
    with pytest.raises(ConfigError, match="missing"):
        other.load_kd_state_dict(state)


def test_unknown_term_and_option_errors(plugin):
    with pytest.raises(UnknownComponentError, match="test_mse"):
        Distiller(KDConfig(terms=[{"name": "nonexistent"}]), student=STUDENT, teacher=TEACHER)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['colour'\]"):
        Distiller(KDConfig(terms=[{"name": "test_mse", "colour": 3}]), student=STUDENT, teacher=TEACHER)
    with pytest.raises(UnknownComponentError, match="available scheduler components"):
        Distiller(KDConfig(terms=[{"name": "test_mse"}], scheduler="nope"), student=STUDENT, teacher=TEACHER)


def test_batch_context_packed_sequences():
    labels = torch.tensor([[5, 6, 7, -100, 8, 9]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    batch = BatchContext.from_inputs(labels=labels, position_ids=position_ids)
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1]]
    # targets are shifted; the last token of sequence 0 must not predict sequence 1's first token
    assert batch.labels.tolist() == [[6, 7, -100, 8, 9, -100]]


def test_batch_context_padding():
    labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = BatchContext.from_inputs(labels=labels, attention_mask=mask)
    assert batch.sequence_ids.tolist() == [[0, 0, 0], [0, 0, -1]]
    assert batch.token_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.labels.tolist() == [[2, 3, -100], [5, -100, -100]]


def _logit_captures(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    head = torch.randn(11, 6, generator=g, requires_grad=True)
    student = ModelCapture(info=STUDENT, final_hidden=hidden, lm_head_weight=head)
    teacher = ModelCapture(info=TEACHER, final_hidden=torch.randn(2, 5, 8, generator=g),
                           lm_head_weight=torch.randn(11, 8, generator=g))
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    batch = BatchContext.from_inputs(labels=labels, attention_mask=torch.ones(2, 5, dtype=torch.long), step=3)
    return student, teacher, batch, (hidden, head)


def test_fused_task_loss_with_weights_in_advance_equals_the_host_ce():
    """Constant weights are known before the forward: the fused CE's gradient is combined with the DKD term's
    before the LM head, and the step's loss and gradients are those of the host CE -- also with a data-parallel world
    factor, which scales the term and the CE alike."""
    from kd_plugins.functional import linear_ce_reference

    config = KDConfig(ce_weight=0.8, terms=[{"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    student, teacher, batch, params = _logit_captures()
    facts = dict(loss_scaled_for_ga=True, items_world_factor=1.5)
    plan = distiller.plan(HostFacts(fusable_task_loss=True, **facts), step=batch.step)
    assert plan.student_mode is StudentMode.FUSED_CE and plan.carrier == "dkd"
    assert plan.ce_grad_ratio == pytest.approx(0.8 * 1.5 / (0.5 * 1.5))
    fused = distiller(student, teacher, batch, plan=plan)
    got = torch.autograd.grad(fused.loss, params)
    host_ce = 1.5 * linear_ce_reference(student.final_hidden, student.lm_head_weight, batch.labels)
    host_plan = distiller.plan(HostFacts(**facts), step=batch.step)
    assert host_plan.student_mode is StudentMode.HOST
    host = distiller(student, teacher, batch, plan=host_plan, task_loss=host_ce)
    torch.testing.assert_close(fused.loss, host.loss)
    for x, y in zip(got, torch.autograd.grad(host.loss, params)):
        torch.testing.assert_close(x, y)


def test_a_scheduler_that_announces_a_wrong_weight_is_refused(monkeypatch):
    config = KDConfig(ce_weight=1.0, terms=[{"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    monkeypatch.setattr(distiller.scheduler, "weights_in_advance", lambda step: {"dkd": 0.7})
    student, teacher, batch, _ = _logit_captures()
    plan = distiller.plan(HostFacts(fusable_task_loss=True), step=batch.step)
    with pytest.raises(RuntimeError, match=r"announced weight 0\.7 for term 'dkd' at step 3"):
        distiller(student, teacher, batch, plan=plan)


def test_plans_for_other_terms_or_steps_and_string_task_losses_are_refused():
    config = KDConfig(ce_weight=1.0, terms=[{"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    other = Distiller(KDConfig(terms=[{"name": "forward_kl"}]), student=STUDENT, teacher=TEACHER)
    student, teacher, batch, _ = _logit_captures()
    with pytest.raises(ValueError, match=r"covers terms \['forward_kl'\] but this Distiller has \['dkd'\]"):
        distiller(student, teacher, batch, plan=other.plan(HostFacts(), step=batch.step))
    with pytest.raises(ValueError, match="made for step 4, the batch is at step 3"):
        distiller(student, teacher, batch, plan=distiller.plan(HostFacts(), step=4))
    with pytest.raises(TypeError, match="fused task loss is planned"):
        distiller(student, teacher, batch, task_loss="fused")
    fused = distiller.plan(HostFacts(fusable_task_loss=True), step=batch.step)
    with pytest.raises(ValueError, match="pass task_loss=None"):
        distiller(student, teacher, batch, plan=fused, task_loss=torch.tensor(1.0))


def test_the_step_end_hook_and_the_output_carry_the_detached_losses_and_task_loss(plugin):
    seen = []

    class Recorder:
        @hookimpl
        def kd_step_end(self, step, total, losses, weights):
            seen.append((step, losses, weights))

    kd_plugins.get_plugin_manager().register(Recorder(), name="step_end_recorder")
    distiller = Distiller(KDConfig(ce_weight=0.5, terms=[{"name": "test_mse", "weight": 0.3}]), student=STUDENT,
                          teacher=TEACHER)
    student, teacher, batch = _captures()
    task = torch.tensor(2.5, requires_grad=True)
    out = distiller(student, teacher, batch, task_loss=task)
    (step, losses, weights), = seen
    assert step == 0 and weights == {"test_mse": pytest.approx(0.3)}
    assert set(losses) == {"test_mse"} and not losses["test_mse"].requires_grad
    assert torch.equal(losses["test_mse"], out.losses["test_mse"])
    assert out.task_loss is not None and float(out.task_loss) == 2.5 and not out.task_loss.requires_grad


def test_a_scheduler_without_a_weight_for_a_term_is_named(plugin, monkeypatch):
    config = KDConfig(terms=[{"name": "test_mse"}, {"name": "test_mse", "label": "second"}],
                      scheduler={"name": "test_recording"})
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    monkeypatch.setattr(distiller.scheduler, "weights", lambda **kw: {"test_mse": 1.0})
    with pytest.raises(RuntimeError) as info:
        distiller(*_captures())
    assert str(info.value) == "scheduler 'test_recording' returned no weight for ['second']"


def test_plan_refusals_say_exactly_what_to_do():
    from dataclasses import replace

    config = KDConfig(ce_weight=1.0, terms=[{"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    student, teacher, batch, _ = _logit_captures()
    with pytest.raises(TypeError) as info:
        distiller(student, teacher, batch, task_loss="fused")
    assert str(info.value) == (
        "task_loss='fused': pass the host's task loss tensor or None; the fused task loss is planned "
        "(StudentMode.FUSED_CE in Distiller.plan(...)), not requested by a string")
    fused = distiller.plan(HostFacts(fusable_task_loss=True), step=batch.step)
    with pytest.raises(ValueError) as info:
        distiller(student, teacher, batch, plan=fused, task_loss=torch.tensor(1.0))
    assert str(info.value) == ("the step plan computes the task loss in the carrier term (StudentMode.FUSED_CE); "
                               "pass task_loss=None")
    for carrier in ("nonexistent", None):
        with pytest.raises(ValueError) as info:
            distiller(student, teacher, batch, plan=replace(fused, carrier=carrier))
        assert str(info.value) == (f"the step plan's task-loss carrier {carrier!r} is not a term that carries the "
                                   "task loss (carries_task_loss = True)")


def test_a_fused_plan_whose_carrier_does_not_carry_the_task_loss_is_refused(plugin):
    from dataclasses import replace

    config = KDConfig(ce_weight=1.0, terms=[{"name": "test_mse"}, {"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    student, teacher, batch, _ = _logit_captures()
    fused = distiller.plan(HostFacts(fusable_task_loss=True), step=batch.step)
    assert fused.carrier == "dkd"
    with pytest.raises(ValueError, match=r"carrier 'test_mse' is not a term that carries the task loss"):
        distiller(student, teacher, batch, plan=replace(fused, carrier="test_mse"))


def test_the_announced_weight_message_names_scheduler_term_step_and_the_rule(monkeypatch):
    config = KDConfig(ce_weight=1.0, terms=[{"name": "dkd", "weight": 0.5}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    monkeypatch.setattr(distiller.scheduler, "weights_in_advance", lambda step: {"dkd": 0.7})
    student, teacher, batch, _ = _logit_captures()
    plan = distiller.plan(HostFacts(fusable_task_loss=True), step=batch.step)
    with pytest.raises(RuntimeError) as info:
        distiller(student, teacher, batch, plan=plan)
    assert str(info.value) == (
        "scheduler 'constant' announced weight 0.7 for term 'dkd' at step 3 (weights_in_advance) but weights() "
        "returned 0.5; the fused task-loss gradient was combined with the announced weight. weights_in_advance "
        "must return exactly what weights() will, or None")


class _BuilderPlugin:
    """Builders that misbehave in the ways a third-party plugin can."""

    @hookimpl
    def register_alignment_terms(self, register):
        def forwards(student, teacher, **options):  # accepted options unknowable: the call itself decides
            return _strict_term(student, teacher, **options)

        def _strict_term(student, teacher, layer=-1):
            return ProjectedMSE(student.hidden_size, teacher.hidden_size, layer)

        register("test_forwards", forwards)
        register("test_not_a_term", lambda student, teacher: 42)

        def annotated(student, teacher, **options) -> ProjectedMSE:  # options: those of the class it returns
            return ProjectedMSE(student.hidden_size, teacher.hidden_size, **options)

        register("test_annotated", annotated)


@pytest.fixture
def builders(clean_plugin_manager):
    kd_plugins.get_plugin_manager().register(_BuilderPlugin(), name="test_builders")


def test_an_unknown_option_found_only_by_calling_the_builder_is_named(builders):
    with pytest.raises(ConfigError) as info:
        Distiller(KDConfig(terms=[{"name": "test_forwards", "colour": 3}]), student=STUDENT, teacher=TEACHER)
    assert str(info.value).startswith("term 'test_forwards' (test_forwards): unknown option 'colour' (")
    assert "unexpected keyword argument 'colour'" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)
    Distiller(KDConfig(terms=[{"name": "test_forwards", "layer": 0}]), student=STUDENT, teacher=TEACHER)


def test_a_builder_that_returns_no_term_is_named_with_its_provider(builders):
    with pytest.raises(TypeError) as info:
        Distiller(KDConfig(terms=[{"name": "test_not_a_term"}]), student=STUDENT, teacher=TEACHER)
    assert str(info.value) == ("builder of 'test_not_a_term' from 'test_builders' returned int, expected a "
                               "kd_plugins.DistillationTerm")


def test_the_options_of_an_annotated_forwarding_builder_are_its_classes(builders):
    with pytest.raises(ConfigError) as info:
        Distiller(KDConfig(terms=[{"name": "test_annotated", "layr": 0}]), student=STUDENT, teacher=TEACHER)
    assert str(info.value) == ("term 'test_annotated' (test_annotated): unknown option(s) ['layr'] ('layr' -> did "
                               "you mean 'layer'?); accepted options: ['student_width', 'teacher_width', 'layer']")


def test_one_hint_per_unknown_option_and_none_when_nothing_is_close(plugin):
    from kd_plugins.distiller import _unknown_options_message

    assert _unknown_options_message("term 'x'", ["tempr"], ["temp", "tempo", "weight"]) == (
        "term 'x': unknown option(s) ['tempr'] ('tempr' -> did you mean 'temp'?); accepted options: "
        "['temp', 'tempo', 'weight']")
    assert _unknown_options_message("term 'x'", ["zzz", "layr"], ["layer"]) == (
        "term 'x': unknown option(s) ['zzz', 'layr'] ('layr' -> did you mean 'layer'?); accepted options: ['layer']")
    assert _unknown_options_message("term 'x'", ["zzz"], ["layer"]) == (
        "term 'x': unknown option(s) ['zzz']; accepted options: ['layer']")


def test_the_built_hook_gets_the_distiller_and_its_config(plugin):
    config = KDConfig(terms=[{"name": "test_mse"}])
    distiller = Distiller(config, student=STUDENT, teacher=TEACHER)
    assert plugin.built[-1][0] is distiller and plugin.built[-1][1] is distiller.config


def test_the_plan_follows_fuse_task_loss():
    for fuse, mode in ((True, StudentMode.FUSED_CE), (False, StudentMode.HOST)):
        config = KDConfig(ce_weight=1.0, terms=[{"name": "dkd"}], fuse_task_loss=fuse)
        plan = Distiller(config, student=STUDENT, teacher=TEACHER).plan(HostFacts(fusable_task_loss=True), step=2)
        assert plan.student_mode is mode and plan.step == 2
