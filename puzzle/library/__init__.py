"""Stage 1 of the method: the block library, blockwise local distillation (BLD) and scoring."""
