from services.regime.main import main

main()
