"""The engine every weight-space method shares."""
