"""In-Context Sparse Attention (ISA), LIVEditor-14B (arXiv 2605.04569).

    from in_context_sparse_attention import editing_sparse_attention, ISAConfig
    out = editing_sparse_attention(q, k, v, t_seq_len, s_seq_len, alpha=None,
                                   config=ISAConfig(), backend="torch")
"""
from .api import editing_sparse_attention
from .backends import BACKEND_NAMES
from .config import ISAConfig
from .dense import dense_attention, dense_kernel_name

__all__ = ["editing_sparse_attention", "ISAConfig", "BACKEND_NAMES", "dense_attention", "dense_kernel_name"]
