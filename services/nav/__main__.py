from services.nav.main import main

main()
