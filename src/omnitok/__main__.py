from omnitok.cli import main

# Guarded: a process spawned by omnitok (the demo runs its steps in fresh processes) imports this module again.
if __name__ == "__main__":
    main()
