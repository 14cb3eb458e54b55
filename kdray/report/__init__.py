"""Layer 4, results for people: terminal tables, plots and the HTML report (pandas and matplotlib).
"""
