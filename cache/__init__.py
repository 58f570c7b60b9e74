"""movekd cache package."""
