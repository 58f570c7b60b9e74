"""movekd jobs package."""
