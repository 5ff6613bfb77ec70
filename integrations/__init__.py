"""Adapters to the Hugging Face stack (transformers, TRL, PEFT, accelerate, evaluate).

Installed as ``kd_plugins.integrations``; the only place in kd_plugins that imports those libraries.
"""
