"""kd_plugins: knowledge distillation for LLMs as plug-ins for the Hugging Face fine-tuning stack.

Core imports torch and pluggy only; ``kd_plugins.integrations`` holds the transformers/TRL/PEFT adapters.
"""

from kd_plugins.config import KDConfig, SchedulerConfig, TermConfig
from kd_plugins.distiller import Distiller, DistillOutput
from kd_plugins.errors import (
    ConfigError,
    DuplicateComponentError,
    IncompatibleModelsError,
    KDError,
    PluginLoadError,
    UnknownComponentError,
)
from kd_plugins.hookspecs import hookimpl
from kd_plugins.plan import HostFacts, StepPlan, StudentMode, TermPlan, plan_step
from kd_plugins.plugins import available_components, get_plugin_manager, reset_plugin_manager
from kd_plugins.types import (
    BatchContext,
    DistillationTerm,
    GradientProbe,
    ModelCapture,
    ModelInfo,
    Normalizer,
    Requirements,
    TeacherSource,
    WeightScheduler,
)

__version__ = "0.1.0"

__all__ = [
    "BatchContext",
    "ConfigError",
    "DistillOutput",
    "DistillationTerm",
    "Distiller",
    "DuplicateComponentError",
    "GradientProbe",
    "HostFacts",
    "IncompatibleModelsError",
    "KDConfig",
    "KDError",
    "ModelCapture",
    "ModelInfo",
    "Normalizer",
    "PluginLoadError",
    "Requirements",
    "SchedulerConfig",
    "StepPlan",
    "StudentMode",
    "TeacherSource",
    "TermConfig",
    "TermPlan",
    "UnknownComponentError",
    "WeightScheduler",
    "available_components",
    "get_plugin_manager",
    "hookimpl",
    "plan_step",
    "reset_plugin_manager",
]
