"""The recipes (one module each, its config beside it) and the commands that run them."""
