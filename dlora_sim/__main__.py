from dlora_sim.cli import main

main()
