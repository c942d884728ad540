from stepquant.cli.entry import stepquant

stepquant()
