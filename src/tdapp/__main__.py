from tdapp.cli import main

main()
