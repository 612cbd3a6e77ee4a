from blda.cli import main

main()
