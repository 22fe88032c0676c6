from omnitok.cli import main

main()
