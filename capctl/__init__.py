"""capctl: the command-line client of capd. It imports `protocol`, never `capd`."""
