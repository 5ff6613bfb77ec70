"""The recipes' tests share the integration tests' tiny models, tokenizer and datasets."""

from tests.integrations.conftest import *  # noqa: F401,F403  (fixtures and helpers)
from tests.integrations.conftest import tiny_model, tiny_tokenizer  # noqa: F401
