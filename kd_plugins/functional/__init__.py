"""The functional level: pure tensor-in, tensor-out losses.

Module forms (``nn.Module`` terms built by the registry) live in :mod:`kd_plugins.components` and call these.
"""

from kd_plugins.functional._common import IGNORE_INDEX, normalize_token_sum, shift_labels, valid_mask

__all__ = ["IGNORE_INDEX", "normalize_token_sum", "shift_labels", "valid_mask"]

from kd_plugins.functional.alignment import attention_relation, contrastive, hidden_cosine, hidden_mse

__all__ += ["attention_relation", "contrastive", "hidden_cosine", "hidden_mse"]

from kd_plugins.functional.fused import fused_linear_kd, linear_ce_reference, linear_kd_reference
from kd_plugins.functional.logit import dkd, forward_kl, generalized_jsd, reverse_kl

__all__ += ["forward_kl", "reverse_kl", "generalized_jsd", "dkd", "fused_linear_kd", "linear_ce_reference", "linear_kd_reference"]

from kd_plugins.functional.sparse import sparse_kd_reference, sparse_linear_kd

__all__ += ["sparse_linear_kd", "sparse_kd_reference"]

from kd_plugins.functional.cross_vocab import cross_vocab_kd, sorted_l1, uld

__all__ += ["cross_vocab_kd", "sorted_l1", "uld"]
