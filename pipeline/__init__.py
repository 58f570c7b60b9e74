"""movekd pipeline package."""
