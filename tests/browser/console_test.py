"""The console in a real browser (Debian's Chromium driven by Playwright), over `yunqi demo`.

Logs in as the demo city's people and does what they would: a citizen applies for the urgent
entry permit and sees the decision, its explanation and the permit's QR code, verifies it,
reads who accessed their data, and switches the language; a steward of market regulation runs
a query and sees masked cells marked; an analyst searches the catalog and reads a dataset's
lineage; a department requests a grant and the owner approves it; the traffic steward watches
the city brain's dashboard change. Screenshots of each page go to target/screenshots/.

Usage: python3 tests/browser/console_test.py BINARY
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from playwright.sync_api import expect, sync_playwright

BINARY = sys.argv[1]
SHOTS = os.path.join(os.path.dirname(__file__), "..", "..", "target", "screenshots")


def start_demo(data):
    p = subprocess.Popen(
        [BINARY, "demo", "--data", data, "--http", "127.0.0.1:0", "--pg", "127.0.0.1:0",
         "--residents", "5000", "--vehicles", "2000", "--businesses", "500", "--rate", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, RUST_LOG="warn"))
    url = None
    deadline = time.time() + 300
    for line in p.stdout:
        if line.strip().startswith("API") and url is None:
            url = line.split()[1].replace("/api/v1/", "")
        if line.startswith("demo city: ready"):
            break
        if time.time() > deadline:
            raise SystemExit("the demo did not start")
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    return p, url


def workday():
    d = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=8)).date()
    while True:
        d += datetime.timedelta(days=1)
        if d.weekday() <= 3 and d.isoformat() != "2027-01-01":
            return d.isoformat()


def main():
    os.makedirs(SHOTS, exist_ok=True)
    data = tempfile.mkdtemp(prefix="yunqi-console-")
    server, url = start_demo(data)
    creds = json.load(open(os.path.join(data, "demo", "credentials.json")))
    tok = {p["name"]: p for p in creds["principals"]}
    citizen = tok["c_zhang"]
    plate = next(p for p in citizen["plates"] if not p.startswith("浙A"))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(locale="zh-CN", viewport={"width": 1366, "height": 900})
            # On request (a flag in the session), the next whoami answers 500 ms late.
            page.add_init_script("""
                const realFetch = window.fetch;
                window.fetch = (u, o) => {
                  if (sessionStorage.getItem("test.slow-whoami") && String(u).endsWith("/whoami")) {
                    sessionStorage.removeItem("test.slow-whoami");
                    return new Promise((r) => setTimeout(r, 500)).then(() => realFetch(u, o));
                  }
                  return realFetch(u, o);
                };""")
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def shot(name):
                page.screenshot(path=os.path.join(SHOTS, name + ".png"), full_page=True)

            def login(name):
                page.goto(url + "/")
                # Either the login form, or the page of whoever is still logged in.
                page.locator("#token, #logout:visible").first.wait_for()
                if page.locator("#logout").is_visible():
                    page.click("#logout")
                page.fill("#token", tok[name]["token"])
                page.press("#token", "Enter")
                expect(page.locator("#who")).to_contain_text(tok[name]["role"])

            # Chinese by default for a Chinese browser; a wrong token says what went wrong.
            page.goto(url + "/")
            expect(page.locator("h1")).to_have_text("登录")
            expect(page.locator("#nav")).to_be_hidden()
            page.fill("#token", "yq_not_a_token")
            page.press("#token", "Enter")
            expect(page.locator("[role=alert]")).to_be_visible()
            shot("01-login")
            # An empty token is refused before anything is sent.
            page.fill("#token", "")
            page.press("#token", "Enter")
            expect(page.locator("[role=alert]")).to_contain_text("请先粘贴令牌")
            # A logout clicked while the page is still asking who is logged in stays a logout.
            page.fill("#token", tok["city_analyst"]["token"])
            page.press("#token", "Enter")
            expect(page.locator("#who")).to_contain_text(tok["city_analyst"]["role"])
            page.evaluate("sessionStorage.setItem('test.slow-whoami', '1')")
            page.goto(url + "/")
            page.evaluate("document.getElementById('logout').click()")
            expect(page.locator("#token")).to_be_visible()
            page.wait_for_timeout(800)  # the slowed whoami answers meanwhile
            expect(page.locator("#token")).to_be_visible()
            expect(page.locator("#who")).to_have_text("")
            expect(page.locator("#nav")).to_be_hidden()

            # A citizen applies for the permit: decision, explanation, QR code.
            login("c_zhang")
            page.goto(url + "/#/services/traffic.urgent-entry-permit")
            page.fill("#in-plate", plate)
            page.fill("#in-date", workday())
            page.select_option("#in-window", "day")
            page.fill("#in-reason", "送货")
            page.click("#apply button[type=submit]")
            expect(page.locator("#decision")).to_have_text("已通过")
            # Explained in sentences, the data by its labels, times in Beijing time.
            expect(page.locator("#rules")).to_contain_text("车辆不是浙A号牌")
            expect(page.locator("main")).to_contain_text("机动车登记信息")
            expect(page.locator(".valid-window")).to_contain_text("北京时间")
            qr = page.locator("#qr")
            expect(qr).to_be_visible()
            r = page.request.get(url + qr.get_attribute("src"))
            assert r.ok and r.headers["content-type"] == "image/svg+xml", r.status
            shot("02-permit-decision")
            page.click("text=验证电子证照 >> nth=0")
            expect(page.locator("#vstatus")).to_have_text("尚未生效")
            shot("03-verify")
            # Who accessed my data: the permit's lookup of the vehicle registry, by the service.
            page.goto(url + "/#/audit")
            expect(page.locator("h1")).to_have_text("谁访问了我的数据")
            expect(page.locator("tbody tr").first).to_be_visible()
            shot("04-my-accesses")
            # English on request, kept across pages.
            page.click("#lang")
            expect(page.locator("h1")).to_have_text("Who accessed my data")
            expect(page.locator("#nav a[href='#/services']")).to_have_text("Services")
            shot("05-english")
            page.click("#lang")

            # A steward of market regulation queries the resident register through its grant:
            # names are masked, and marked so.
            login("market_steward")
            page.goto(url + "/#/sql")
            page.fill("#sql", "SELECT id_number, name, birth_date FROM city.residents LIMIT 5")
            page.click("#run")
            expect(page.locator("td.masked").first).to_be_visible()
            shot("06-sql-masked")

            # An analyst of the city searches the catalog and reads the credit score's lineage.
            login("city_analyst")
            page.goto(url + "/#/catalog")
            page.fill("#q", "credit")
            page.press("#q", "Enter")
            page.click("text=city.credit_scores")
            expect(page.locator("main")).to_contain_text("city.payments")
            # The lineage graph links to the sources; the dataset's grants are listed.
            expect(page.locator("svg.lineage")).to_be_visible()
            expect(page.locator("main")).to_contain_text("先看病后付费")
            shot("07-catalog-lineage")

            # Housing asks for a grant; the city's steward approves it from the inbox.
            login("housing_steward")
            page.goto(url + "/#/grants")
            page.fill("#g-dataset", "city.holidays")
            page.fill("#g-columns", "day, kind")
            page.fill("#g-purpose", "公积金: working days for repayments")
            page.fill("#g-until", workday())
            page.click("form button[type=submit]")
            expect(page.locator("main")).to_contain_text("pending")
            login("city_steward")
            page.goto(url + "/#/grants")
            card = page.locator(".card", has_text="city.holidays")
            expect(card).to_be_visible()
            shot("08-grants-inbox")
            card.locator("button.primary").click()
            expect(page.locator(".card", has_text="city.holidays")).to_have_count(0)
            expect(page.locator("tbody")).to_contain_text("active")
            # It ends within a month: marked as expiring.
            expect(page.locator("tbody")).to_contain_text("即将到期")

            # A founder's licensed trade goes to review; a market officer approves it in the queue.
            login("c_li")
            page.goto(url + "/#/services/market.business-registration")
            page.fill("#in-company_name", "杭州云栖控制台食品有限公司")
            page.fill("#in-legal_rep", tok["c_li"]["id_number"])
            page.fill("#in-capital", "500000")
            page.select_option("#in-scope", "food_production")
            page.fill("#in-address", "西湖区文三路")
            page.click("#apply button[type=submit]")
            expect(page.locator("#decision")).to_have_text("审核中")
            login("market_officer")
            page.goto(url + "/#/services/market.business-registration")
            review = page.locator(".review", has_text="杭州云栖控制台食品有限公司")
            expect(review).to_be_visible()
            shot("09-review-queue")
            review.locator("button", has_text="分配给我").click()
            expect(page.locator(".review", has_text="market_officer")).to_be_visible()
            page.locator(".review", has_text="杭州云栖控制台食品有限公司").locator("button.primary").click()
            expect(page.locator(".review", has_text="杭州云栖控制台食品有限公司")).to_have_count(0)

            # The city brain: the dashboard fills from the continuous views and moves on.
            login("traffic_steward")
            page.goto(url + "/#/dashboard")
            expect(page.locator("#window")).to_be_visible(timeout=150_000)
            expect(page.locator("#permits")).to_have_text("1")
            first = page.locator("#window").inner_text()
            shot("10-dashboard")
            expect(page.locator("#window")).not_to_have_text(first, timeout=150_000)
            # ECharts drew the series: a line per district, the segments' bars, the threshold.
            for c in ["#chart-districts", "#chart-segments", "#chart-zone"]:
                expect(page.locator(c + " svg").first).to_be_visible()
                expect(page.locator(c + " svg path")).not_to_have_count(0)
            expect(page.locator("#chart-districts")).to_contain_text("上城区")
            shot("11-dashboard-later")
            # A large operations-centre screen.
            page.set_viewport_size({"width": 2560, "height": 1440})
            shot("12-dashboard-wall")

            # On a phone (浙里办 is an app): a citizen applies at 390×844 with touch, reads the
            # decision in sentences, and may not apply for another citizen's vehicle.
            phone = browser.new_context(locale="zh-CN", viewport={"width": 390, "height": 844},
                                        device_scale_factor=2, is_mobile=True, has_touch=True)
            page = phone.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            login("c_wang")
            page.goto(url + "/#/services/traffic.urgent-entry-permit")
            expect(page.locator("#apply")).to_be_visible()
            mine = next(p for p in tok["c_wang"]["plates"] if not p.startswith("浙A"))
            page.fill("#in-plate", mine)
            page.fill("#in-date", workday())
            expect(page.locator("#in-window option").first).to_have_text("当日全天（0时至24时）")
            shot("13-phone-form")
            # Touch targets are large enough to hit with a thumb; nothing scrolls sideways.
            for sel in ["#apply button[type=submit]", "#in-window", "#in-plate", "#logout"]:
                box = page.locator(sel).bounding_box()
                assert box and box["height"] >= 44, (sel, box)
            page.fill("#in-reason", "就医")
            page.click("#apply button[type=submit]")
            expect(page.locator("#decision")).to_have_text("已通过")
            expect(page.locator("#rules li").first).to_contain_text("车辆不是浙A号牌")
            text = page.locator("main").inner_text()
            assert "starts_with" not in text and "not_met" not in text, text
            assert "北京时间" in text and "Z" not in page.locator(".valid-window").inner_text(), text
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, ("the page scrolls sideways", width)
            shot("14-phone-decision")
            theirs = next(p for p in tok["c_zhao"]["plates"] if not p.startswith("浙A"))
            page.fill("#in-plate", theirs)
            page.click("#apply button[type=submit]")
            expect(page.locator("[role=alert]")).to_contain_text("本人名下")
            shot("15-phone-refused")
            phone.close()

            assert not errors, errors
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("console: all pages passed in Chromium; screenshots in target/screenshots/")


if __name__ == "__main__":
    main()
