--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: alerts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.alerts (
    id bigint NOT NULL,
    created_at double precision NOT NULL,
    model_sha256 text NOT NULL,
    scope text NOT NULL,
    kind text NOT NULL,
    state text NOT NULL,
    summary text NOT NULL,
    detail text NOT NULL,
    approved_at double precision,
    approved_by text
);


--
-- Name: alerts_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.alerts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: alerts_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.alerts_id_seq OWNED BY public.alerts.id;


--
-- Name: counters; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.counters (
    name text NOT NULL,
    value bigint NOT NULL
);


--
-- Name: devices; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.devices (
    device text NOT NULL,
    fleet text NOT NULL,
    state text NOT NULL,
    last_seen double precision NOT NULL,
    status_at double precision,
    model_sha256 text,
    model_name text,
    model_version text,
    status text
);


--
-- Name: drift_device; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.drift_device (
    model_sha256 text NOT NULL,
    device text NOT NULL,
    window_start double precision NOT NULL,
    n bigint NOT NULL,
    p_value double precision,
    q_value double precision,
    effect double precision,
    drifted integer NOT NULL,
    channels text NOT NULL
);


--
-- Name: drift_fleet; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.drift_fleet (
    model_sha256 text NOT NULL,
    bucket_start double precision NOT NULL,
    channel text NOT NULL,
    n bigint NOT NULL,
    test text NOT NULL,
    statistic double precision,
    p_value double precision,
    effect double precision,
    drifted integer NOT NULL,
    detail text NOT NULL
);


--
-- Name: evaluations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.evaluations (
    model_sha256 text NOT NULL,
    evaluated_at double precision NOT NULL,
    detail text NOT NULL
);


--
-- Name: labels; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.labels (
    id bigint NOT NULL,
    device text NOT NULL,
    model_sha256 text NOT NULL,
    received_at double precision NOT NULL,
    confusion bytea NOT NULL
);


--
-- Name: labels_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.labels_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: labels_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.labels_id_seq OWNED BY public.labels.id;


--
-- Name: triggers; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.triggers (
    id bigint NOT NULL,
    alert_id bigint NOT NULL,
    at double precision NOT NULL,
    command text NOT NULL,
    outcome text NOT NULL,
    returncode integer,
    finished_at double precision,
    output text
);


--
-- Name: triggers_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.triggers_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: triggers_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.triggers_id_seq OWNED BY public.triggers.id;


--
-- Name: windows; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.windows (
    device text NOT NULL,
    model_sha256 text NOT NULL,
    window_start double precision NOT NULL,
    window_end double precision NOT NULL,
    seq bigint NOT NULL,
    n bigint NOT NULL,
    fleet text NOT NULL,
    model_name text NOT NULL,
    model_version text NOT NULL,
    received_at double precision NOT NULL,
    counts bytea NOT NULL,
    confusion bytea
);


--
-- Name: alerts id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts ALTER COLUMN id SET DEFAULT nextval('public.alerts_id_seq'::regclass);


--
-- Name: labels id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labels ALTER COLUMN id SET DEFAULT nextval('public.labels_id_seq'::regclass);


--
-- Name: triggers id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.triggers ALTER COLUMN id SET DEFAULT nextval('public.triggers_id_seq'::regclass);


--
-- Data for Name: alerts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.alerts VALUES (2, 1796175604.358444, 'abababababababababababababababababababababababababababababababab', 'device:dev0', 'data_drift', 'retrain_failed', 'dev0', '{}', NULL, NULL);
INSERT INTO public.alerts VALUES (1, 1796175604.3574066, 'abababababababababababababababababababababababababababababababab', 'fleet', 'data_drift', 'approved', 'class_0 drifted', '{"channels": ["class_0"]}', 1796175604.3605688, 'carol');


--
-- Data for Name: counters; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.counters VALUES ('accepted', 12);
INSERT INTO public.counters VALUES ('rejected', 2);
INSERT INTO public.counters VALUES ('duplicate', 1);


--
-- Data for Name: devices; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.devices VALUES ('dev2', 'test', 'online', 1700000241, NULL, 'abababababababababababababababababababababababababababababababab', 'digits', '1.0.0', NULL);
INSERT INTO public.devices VALUES ('dev1', 'test', 'offline', 1700001000, 1700001000, 'abababababababababababababababababababababababababababababababab', 'digits', '1.0.0', '{"state": "offline", "reason": "fixture"}');
INSERT INTO public.devices VALUES ('dev0', 'test', 'online', 1700000061, NULL, 'abababababababababababababababababababababababababababababababab', 'digits', '1.0.0', NULL);


--
-- Data for Name: drift_device; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.drift_device VALUES ('abababababababababababababababababababababababababababababababab', 'dev0', 1700000000, 100, 0.01, 0.02, 0.3, 1, '["class_0"]');


--
-- Data for Name: drift_fleet; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.drift_fleet VALUES ('abababababababababababababababababababababababababababababababab', 1700000000, 'class_0', 300, 'chi2', 4.5, 0.03, 0.2, 1, '{}');


--
-- Data for Name: evaluations; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.evaluations VALUES ('abababababababababababababababababababababababababababababababab', 1700000500, '{"cutoff": 1700000000.0, "bundle": "digits-1.0.0"}');


--
-- Data for Name: labels; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.labels VALUES (1, 'dev2', 'abababababababababababababababababababababababababababababababab', 1700000030, '\x0300000000000000010000000000000000000000000000000400000000000000');


--
-- Data for Name: triggers; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.triggers VALUES (1, 1, 1700000600, '["retrain", "--x"]', 'succeeded', 0, 1796175604.3624203, 'done
');
INSERT INTO public.triggers VALUES (2, 2, 1700000700, '["retrain"]', 'refused', NULL, 1700000700, NULL);


--
-- Data for Name: windows; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.windows VALUES ('dev0', 'abababababababababababababababababababababababababababababababab', 1700000000, 1700000060, 0, 100, 'test', 'digits', '1.0.0', 1700000061, '\x00000100020003000400050006000700', '\x0100000000000000000000000000000000000000000000000100000000000000');
INSERT INTO public.windows VALUES ('dev0', 'abababababababababababababababababababababababababababababababab', 1700000060, 1700000120, 1, 100, 'test', 'digits', '1.0.0', 1700000121, '\x01000200030004000500060007000800', '\x0100000000000000000000000000000000000000000000000100000000000000');
INSERT INTO public.windows VALUES ('dev0', 'abababababababababababababababababababababababababababababababab', 1700000120, 1700000180, 2, 100, 'test', 'digits', '1.0.0', 1700000181, '\x02000300040005000600070008000900', '\x0100000000000000000000000000000000000000000000000100000000000000');
INSERT INTO public.windows VALUES ('dev0', 'abababababababababababababababababababababababababababababababab', 1700000180, 1700000240, 3, 100, 'test', 'digits', '1.0.0', 1700000241, '\x03000400050006000700080009000a00', '\x0100000000000000000000000000000000000000000000000100000000000000');
INSERT INTO public.windows VALUES ('dev1', 'abababababababababababababababababababababababababababababababab', 1700000000, 1700000060, 0, 101, 'test', 'digits', '1.0.0', 1700000061, '\x000002000400060008000a000c000e00', NULL);
INSERT INTO public.windows VALUES ('dev1', 'abababababababababababababababababababababababababababababababab', 1700000060, 1700000120, 1, 101, 'test', 'digits', '1.0.0', 1700000121, '\x010003000500070009000b000d000f00', NULL);
INSERT INTO public.windows VALUES ('dev1', 'abababababababababababababababababababababababababababababababab', 1700000120, 1700000180, 2, 101, 'test', 'digits', '1.0.0', 1700000181, '\x02000400060008000a000c000e001000', NULL);
INSERT INTO public.windows VALUES ('dev1', 'abababababababababababababababababababababababababababababababab', 1700000180, 1700000240, 3, 101, 'test', 'digits', '1.0.0', 1700000241, '\x03000500070009000b000d000f001100', NULL);
INSERT INTO public.windows VALUES ('dev2', 'abababababababababababababababababababababababababababababababab', 1700000000, 1700000060, 0, 102, 'test', 'digits', '1.0.0', 1700000061, '\x00000300060009000c000f0012001500', NULL);
INSERT INTO public.windows VALUES ('dev2', 'abababababababababababababababababababababababababababababababab', 1700000060, 1700000120, 1, 102, 'test', 'digits', '1.0.0', 1700000121, '\x0100040007000a000d00100013001600', NULL);
INSERT INTO public.windows VALUES ('dev2', 'abababababababababababababababababababababababababababababababab', 1700000120, 1700000180, 2, 102, 'test', 'digits', '1.0.0', 1700000181, '\x0200050008000b000e00110014001700', NULL);
INSERT INTO public.windows VALUES ('dev2', 'abababababababababababababababababababababababababababababababab', 1700000180, 1700000240, 3, 102, 'test', 'digits', '1.0.0', 1700000241, '\x0300060009000c000f00120015001800', NULL);


--
-- Name: alerts_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.alerts_id_seq', 2, true);


--
-- Name: labels_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.labels_id_seq', 1, true);


--
-- Name: triggers_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.triggers_id_seq', 2, true);


--
-- Name: alerts alerts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_pkey PRIMARY KEY (id);


--
-- Name: counters counters_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.counters
    ADD CONSTRAINT counters_pkey PRIMARY KEY (name);


--
-- Name: devices devices_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.devices
    ADD CONSTRAINT devices_pkey PRIMARY KEY (device);


--
-- Name: drift_device drift_device_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.drift_device
    ADD CONSTRAINT drift_device_pkey PRIMARY KEY (model_sha256, device, window_start);


--
-- Name: drift_fleet drift_fleet_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.drift_fleet
    ADD CONSTRAINT drift_fleet_pkey PRIMARY KEY (model_sha256, bucket_start, channel);


--
-- Name: evaluations evaluations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.evaluations
    ADD CONSTRAINT evaluations_pkey PRIMARY KEY (model_sha256);


--
-- Name: labels labels_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.labels
    ADD CONSTRAINT labels_pkey PRIMARY KEY (id);


--
-- Name: triggers triggers_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.triggers
    ADD CONSTRAINT triggers_pkey PRIMARY KEY (id);


--
-- Name: windows windows_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.windows
    ADD CONSTRAINT windows_pkey PRIMARY KEY (device, model_sha256, window_start);


--
-- Name: windows_by_model_time; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX windows_by_model_time ON public.windows USING btree (model_sha256, window_start);


--
-- PostgreSQL database dump complete
--


