-- Argo CD health check of instructune.io/InstructionTune, from the status the operator writes
-- (operator/instructune_operator/api.py: Phase, ConditionType, Reason; docs/operations.md, "Argo CD").
-- Argo CD runs it as `resource.customizations.health.instructune.io_InstructionTune` of argocd-cm,
-- in Lua 5.1 with only the base, table and a safe os library: no string library, so messages are
-- built with `..` and tostring alone. tests/unit/test_argocd_health.py runs it the same way.

-- Why a Ray pod cannot run, that waiting does not cure: Argo CD's own Pod health calls the two
-- back-offs Degraded, and an OOMKilled container is killed again with the same (immutable) memory.
-- Unschedulable is not among them: a pool may be full for now, or scale up.
local POD_FAILURES = {ImagePullBackOff = true, CrashLoopBackOff = true, OOMKilled = true}

local function condition(status, conditionType)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == conditionType then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition, or nil.
local function explain(c)
  if c == nil then
    return nil
  end
  if c.message == nil or c.message == "" then
    return c.reason
  end
  if c.reason == nil then
    return c.message
  end
  return c.reason .. ": " .. c.message
end

-- " step 120/400 (30%)" while the job reports progress.
local function progress(status)
  local p = status.progress
  if p == nil or p.step == nil or p.totalSteps == nil then
    return ""
  end
  local text = " step " .. tostring(p.step) .. "/" .. tostring(p.totalSteps)
  if p.percent ~= nil then
    text = text .. " (" .. tostring(p.percent) .. "%)"
  end
  return text
end

local hs = {}
local status = obj.status

-- Argo CD's convention: a resource its controller has not written a status for yet is Progressing.
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to validate the tune"
  return hs
end

-- A status written for an older spec says nothing about the current one (e.g. a fixed invalid spec,
-- or suspend just set): wait until the operator has acted on this generation.
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase

if phase == "Succeeded" then
  hs.status = "Healthy"
  local serving = condition(status, "Serving")
  if serving ~= nil and serving.status == "True" then
    hs.message = serving.message
  else
    hs.message = explain(condition(status, "Succeeded")) or "Succeeded"
  end
  return hs
end

if phase == "Failed" then
  hs.status = "Degraded"
  -- An invalid spec fails the tune through Validated alone; every other failure sets Succeeded=False
  -- (and Ready=False) with the reason: BackoffLimitExceeded, GateFailed, DeadlineExceeded, ...
  local validated = condition(status, "Validated")
  if validated ~= nil and validated.status == "False" then
    hs.message = explain(validated)
  else
    hs.message = explain(condition(status, "Succeeded")) or explain(condition(status, "Ready")) or "Failed"
  end
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  -- Training=False/Suspended says what a suspension keeps: "suspended: the Ray cluster is removed, ..."
  local training = condition(status, "Training")
  hs.message = (training ~= nil and training.message ~= nil and training.message ~= "" and training.message) or "Suspended"
  return hs
end

if phase == "Deploying" then
  -- The gate passed; the serving rollout waits for a ready replica.
  hs.status = "Progressing"
  hs.message = "Deploying: " .. (explain(condition(status, "Serving")) or "the serving rollout has started")
  return hs
end

if phase == "Pending" or phase == "Provisioning" or phase == "Training" or phase == "Evaluating" then
  local cluster = condition(status, "ClusterReady")
  if cluster ~= nil and cluster.status == "False" and POD_FAILURES[cluster.reason] then
    hs.status = "Degraded"
    hs.message = explain(cluster)
    return hs
  end
  hs.status = "Progressing"
  if phase == "Pending" then
    hs.message = "Pending: " .. (explain(condition(status, "Validated")) or "waiting for the operator")
  elseif phase == "Provisioning" then
    -- Why the Ray cluster is not ready yet, e.g. "Unschedulable: pod ...: 0/6 nodes are available".
    hs.message = explain(cluster) or "Provisioning: waiting for the Ray cluster"
  else
    -- The job's attempt, or why the last one failed and the next one resumes (Retrying).
    local training = explain(condition(status, "Training"))
    hs.message = phase .. progress(status)
    if training ~= nil then
      hs.message = hs.message .. ": " .. training
    end
  end
  return hs
end

-- A phase this check does not know (a newer operator): say so rather than guess.
hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
