// yunqi's NGSI-LD API driven by npm's ngsijs (FIWARE's JavaScript library), as a FIWARE
// application would use it: create, retrieve, query with q and count, list types, delete an
// attribute, delete an entity, create, read and delete a subscription (its notification goes to
// NOTIFY_URL, which ngsildclient_test.py checks). Run by ngsildclient_test.py, which starts yunqi and passes
// YUNQI_URL and YUNQI_TOKEN (a device account of the type's department).
"use strict";
const assert = require("assert");
const NGSI = require("ngsijs");

async function main() {
  const conn = new NGSI.Connection(process.env.YUNQI_URL, {
    headers: { Authorization: "Bearer " + process.env.YUNQI_TOKEN },
  });
  const ld = conn.ld;
  const id = "urn:ngsi-ld:TrafficFlowObserved:js-001";
  await ld.createEntity({
    id, type: "TrafficFlowObserved",
    intensity: { type: "Property", value: 321 },
    district: { type: "Property", value: "滨江区" },
  });
  const got = await ld.getEntity({ id });
  assert.strictEqual(got.entity.intensity.value, 321, JSON.stringify(got.entity));
  const q = await ld.queryEntities({ type: "TrafficFlowObserved", q: "intensity>300", count: true });
  assert.deepStrictEqual(q.results.map((e) => e.id), [id]);
  assert.strictEqual(q.count, 1);
  const none = await ld.queryEntities({ type: "NoSuchType" });
  assert.deepStrictEqual(none.results, []);
  const types = await ld.listTypes();
  assert.ok(JSON.stringify(types).includes("TrafficFlowObserved"), JSON.stringify(types));
  await ld.deleteEntityAttribute({ id, attribute: "district" });
  const after = await ld.getEntity({ id });
  assert.strictEqual(after.entity.district, undefined, JSON.stringify(after.entity));
  await ld.deleteEntity({ id });
  await assert.rejects(ld.getEntity({ id }), (e) => e instanceof NGSI.NotFoundError || /not found/i.test(String(e)));
  console.log("ngsijs: create, retrieve, query, count, types, attribute and entity delete passed");

  const sub = (await ld.createSubscription({
    type: "Subscription",
    entities: [{ type: "TrafficFlowObserved", id: "urn:ngsi-ld:TrafficFlowObserved:js-002" }],
    notification: { format: "keyValues", endpoint: { uri: process.env.NOTIFY_URL, accept: "application/json" } },
  })).subscription;
  assert.ok(sub.id.startsWith("urn:ngsi-ld:Subscription:"), JSON.stringify(sub));
  await ld.createEntity({ id: "urn:ngsi-ld:TrafficFlowObserved:js-002", type: "TrafficFlowObserved",
    intensity: { type: "Property", value: 5 } });
  let seen = null;
  for (let i = 0; i < 200; i++) {
    seen = (await ld.getSubscription({ id: sub.id })).subscription;
    if (seen.notification.timesSent >= 1) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(seen.notification.timesSent >= 1, JSON.stringify(seen));
  const list = await ld.listSubscriptions();
  assert.deepStrictEqual(list.results.map((s) => s.id), [sub.id]);
  await ld.deleteSubscription({ id: sub.id });
  await assert.rejects(ld.getSubscription({ id: sub.id }));
  console.log("ngsijs: subscription create, get, list, delete passed");
}

main().catch((e) => { console.error(e); process.exit(1); });
