"""Stage 3 of the method: realize the chosen child, distil it (GKD), evaluate and export it."""
