"""The `blda` command line: assembles the sub-commands of the core, training and service packages."""
