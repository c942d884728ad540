from stepquant.cli.main import main

main()
