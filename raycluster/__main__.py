from raycluster.cli import main

main()
