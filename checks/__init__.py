"""Doctor checks, one module each; registered in CHECKS."""
