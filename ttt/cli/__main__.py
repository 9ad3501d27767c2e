from ttt.cli import main

main()
