"""The processes capd starts: launching them, stopping their groups, and finding the ones a
killed capd left running."""
