from dynalign.cli import main

main()
