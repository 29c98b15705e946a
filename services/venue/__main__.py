from services.venue.main import main

main()
