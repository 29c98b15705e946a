from services.hedging.main import main

main()
