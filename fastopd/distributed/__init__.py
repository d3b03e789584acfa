"""Scale-out on torch.distributed: the vocab-parallel loss's row math, and the process-group helpers the trainer
uses under torchrun (DDP, FSDP2)."""

from fastopd.distributed.vocab_parallel import copy_to_vocab_parallel, vocab_layout, vocab_parallel_kernel

__all__ = ["copy_to_vocab_parallel", "vocab_layout", "vocab_parallel_kernel"]
