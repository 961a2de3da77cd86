"""Stage 2 of the method: measured costs on the target hardware and the MIP search."""
