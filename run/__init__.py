"""Running: the command line, the study (seeds x variants), the grid, the launcher, the ladder, predict."""
