"""movekd student package."""
