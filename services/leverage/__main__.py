from services.leverage.main import main

main()
